"""What every API's request models share: field types that say what they expect, TGI's error
body, pydantic's errors as TGI's 422, and the models' schemas as OpenAPI 3.0 components."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NoReturn, TypeVar

import pydantic
from pydantic import AllowInfNan, BaseModel, ConfigDict, Strict
from pydantic_core import PydanticCustomError

from shardline.router.errors import ValidationError

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class Expect:
    """What a 422 says a field must be: "`name` must be {text}"."""

    text: str


# JSON's types, without pydantic's coercions (a string is no number, a float no integer).
StrictBool = Annotated[bool, Strict(), Expect("bool")]
StrictInt = Annotated[int, Strict(), Expect("int")]
StrictStr = Annotated[str, Strict(), Expect("str")]
FiniteFloat = Annotated[float, Strict(), AllowInfNan(False), Expect("a finite number")]
StrList = Annotated[list[Annotated[str, Strict()]], Expect("list[str]")]
TokenIds = Annotated[list[Annotated[int, Strict()]], Expect("a list of token ids")]


GRAMMAR_TYPES = ("json", "regex", "json_schema", "json_object", "text")


class Grammar(BaseModel):
    """Constrained output in either API's shape: TGI's `grammar` ({"type": "json" | "regex",
    "value": ...} or {"type": "json_schema", "value": {"schema": ...}}) or OpenAI's
    `response_format` ({"type": "text" | "json_object"} or {"type": "json_schema",
    "json_schema": {"schema": ...}}); either field takes either shape."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal[GRAMMAR_TYPES]
    json_schema: dict[str, Any] | None = None
    value: Any = None


GrammarField = Annotated[Grammar, Expect(f"an object whose `type` is one of {GRAMMAR_TYPES}")]


class ErrorResponse(BaseModel):
    """TGI's error JSON: every 4xx and 5xx the router answers."""

    error: str
    error_type: str


@dataclass(frozen=True)
class Namespace:
    """A nested object whose fields errors name alone, as TGI names `parameters`' fields."""


CUSTOM_ERROR = "shardline"
"""A validator's own refusal: its message follows the place it names ("`x[0]` is an image...")."""


def refuse(message: str) -> NoReturn:
    """A validator's refusal, worded after the place it names."""
    raise PydanticCustomError(CUSTOM_ERROR, message)


def parse(model: type[Model], body: Any) -> Model:
    """`body` as `model`; a 422 naming the first field that does not fit."""
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as error:
        raise ValidationError(error_message(model, error.errors(include_url=False))) from None


def error_message(model: type[BaseModel], errors: list[Any]) -> str:
    """TGI's wording for the first fault: "`name` must be ..." for the innermost place that
    declares what it expects (a grammar's `type` is the grammar's fault); its bounds for an
    out-of-range value; a validator's own words for its refusal."""
    error = _first_fault(errors)
    places = _places(model, error["loc"])
    if not places:
        return "the request body must be a JSON object"
    blamed = next((p for p in reversed(places) if p.expect), places[0])
    got = f" (got {error['input']!r})"
    if error["type"] == CUSTOM_ERROR:
        return f"{places[-1].name} {error['msg']}"
    if error["type"] == "missing" and blamed is places[-1] or _is_empty(error):
        return f"{blamed.name} is required" + (
            f" and must be {blamed.expect}" if blamed.expect else ""
        )
    if error["type"] == "missing":
        return f"{blamed.name} must be {blamed.expect}"
    if error["type"] in _RANGE_ERRORS:
        return f"{blamed.name} must be {_bounds(blamed.metadata)}{got}"
    return f"{blamed.name} must be {blamed.expect or 'valid'}{got}"


_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def _first_fault(errors: list[Any]) -> Any:
    """The first error, or the deepest of those beside it: a value of a union (a string or a
    list of parts) is blamed where its closest alternative failed (an empty list where a
    non-empty one is needed before a wrong type)."""
    first = errors[0]
    parent = first["loc"][:-1]
    if not parent:
        return first
    beside = [e for e in errors if e["loc"][: len(parent)] == parent]
    return max(beside, key=lambda e: (len(e["loc"]), _is_empty(e)))


def _is_empty(error: Any) -> bool:
    """An empty value where a non-empty one is needed: "is required"."""
    return error["type"] == "too_short" and not error["input"]


@dataclass(frozen=True)
class _Place:
    """A place in the body an error passed through: its name as errors write it, what it
    expects and its constraints."""

    name: str
    expect: str | None
    metadata: list[Any]


def _places(model: type[BaseModel], loc: tuple[Any, ...]) -> list[_Place]:
    """The places `loc` passes through, outermost first (union alternatives are no place)."""
    places: list[_Place] = []
    path = ""
    annotation: Any = model
    for part in loc:
        core = _unwrap(annotation)[0]
        alternatives = _alternatives(core)
        if len(alternatives) > 1:  # `part` names the alternative that failed
            tag = str(part).split("[")[0].lower()
            annotation = next((a for a in alternatives if _tag(a) == tag), None)
            if annotation is None:
                break
            continue
        core = _unwrap(alternatives[0])[0] if alternatives else core
        fields = getattr(core, "model_fields", None)
        if fields is not None and isinstance(part, str) and part in fields:
            info = fields[part]
            annotation, metadata = info.annotation, list(info.metadata)
            path = part if not path else f"{path}.{part}"
        elif isinstance(part, int) and typing.get_origin(core) in (list, tuple):
            annotation, metadata = typing.get_args(core)[0], []
            path = f"{path}[{part}]"
        elif typing.get_origin(core) is dict:  # a value is named as its object
            annotation, metadata = typing.get_args(core)[1], []
        else:
            break
        places.append(_Place(_quoted(path), _expectation(annotation, metadata), metadata))
        if any(isinstance(m, Namespace) for m in (*_markers(annotation), *metadata)):
            path = ""
    return places


def _alternatives(core: Any) -> list[Any]:
    """A union's members other than None; [] for anything else."""
    if typing.get_origin(core) not in (typing.Union, types.UnionType):
        return []
    return [member for member in typing.get_args(core) if member is not type(None)]


def _tag(alternative: Any) -> str:
    """The name pydantic gives a union's alternative in an error's location, before any "["."""
    inner = _unwrap(alternative)[0]
    name = getattr(inner, "__name__", None) or str(inner)
    return name.lower()


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """`Annotated[T, *markers]` as (T, markers), nested ones flattened."""
    markers: list[Any] = []
    while typing.get_origin(annotation) is Annotated:
        markers.extend(annotation.__metadata__)
        annotation = typing.get_args(annotation)[0]
    return annotation, markers


def _is_model(candidate: Any) -> bool:
    return isinstance(candidate, type) and issubclass(candidate, BaseModel)


def _quoted(path: str) -> str:
    """A place as errors write it, quoted up to its first index: "`messages[0]`.role",
    "`text.format`"."""
    end = path.find("]") + 1 or len(path)
    return f"`{path[:end]}`{path[end:]}"


def _expectation(annotation: Any, metadata: list[Any]) -> str | None:
    """The outermost `Expect`: `Annotated[StrictStr, Expect("a string")]` says "a string"."""
    expects = [m.text for m in (*_markers(annotation), *metadata) if isinstance(m, Expect)]
    return expects[-1] if expects else None


def _markers(annotation: Any) -> list[Any]:
    """Metadata of `Annotated[...]` at the top of `annotation` or of a union member."""
    if typing.get_origin(annotation) is Annotated:
        return list(annotation.__metadata__)
    return [m for arg in typing.get_args(annotation) for m in _markers(arg)]


def _bounds(metadata: list[Any]) -> str:
    """TGI's phrasing: "strictly positive", "> 0.0 and < 1.0", ">= -2.0 and <= 2.0"."""
    limits = {
        symbol: getattr(marker, attribute)
        for marker in metadata
        for attribute, symbol in _SYMBOLS.items()
        if getattr(marker, attribute, None) is not None
    }
    if limits == {">": 0} or limits == {">": 0.0}:
        return "strictly positive"
    return " and ".join(f"{symbol} {value}" for symbol, value in limits.items())


_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def ref(name: str) -> dict[str, str]:
    """An OpenAPI reference to the component `name`."""
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def openapi_components(models: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """Each model's JSON schema (and the models it refers to) as OpenAPI 3.0 components."""
    components: dict[str, Any] = {}
    for name, model in models.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[name] = schema
    return {name: _openapi3(schema) for name, schema in components.items()}


def _openapi3(node: Any) -> Any:
    """JSON Schema 2020-12 as OpenAPI 3.0 reads it: a null alternative becomes `nullable`,
    numeric exclusive bounds booleans, `const` a one-value `enum`; titles are left out."""
    if isinstance(node, list):
        return [_openapi3(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {
        key: {name: _openapi3(field) for name, field in value.items()}
        if key == "properties"
        else _openapi3(value)
        for key, value in node.items()
        if key != "title"
    }
    alternatives = node.get("anyOf")
    if alternatives and {"type": "null"} in alternatives:
        rest = [a for a in alternatives if a != {"type": "null"}]
        del node["anyOf"]
        single = rest[0] if len(rest) == 1 else {"anyOf": rest}
        if "$ref" in single:
            single = {"allOf": [single]}
        node = {**single, **node, "nullable": True}
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(exclusive), int | float) and not isinstance(node[exclusive], bool):
            node[bound], node[exclusive] = node[exclusive], True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "examples" in node:
        node["example"] = node.pop("examples")[0]
    return node
