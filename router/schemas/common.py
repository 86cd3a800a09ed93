"""What every API's request models share: field types that say what they expect, TGI's error
body, pydantic's errors as TGI's 422, and the models' schemas as OpenAPI 3.0 components."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import AllowInfNan, BaseModel, Strict
from pydantic.fields import FieldInfo

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


class ErrorResponse(BaseModel):
    """TGI's error JSON: every 4xx and 5xx the router answers."""

    error: str
    error_type: str


def parse(model: type[Model], body: Any) -> Model:
    """`body` as `model`; a 422 naming the first field that does not fit."""
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as error:
        raise ValidationError(error_message(model, error.errors(include_url=False)[0])) from None


def error_message(model: type[BaseModel], error: Any) -> str:
    """TGI's wording: "`name` must be ..." for the innermost field that declares what it
    expects (a grammar's `type` is the grammar's fault); its bounds for an out-of-range value."""
    field = _blamed_field(model, error["loc"])
    if field is None:
        return "the request body must be a JSON object"
    name, info = field
    expect = _expectation(info.annotation, info.metadata)
    if error["type"] == "missing":
        return f"`{name}` is required" + (f" and must be {expect}" if expect else "")
    if error["type"] in _RANGE_ERRORS:
        return f"`{name}` must be {_bounds(info.metadata)} (got {error['input']!r})"
    return f"`{name}` must be {expect or 'valid'} (got {error['input']!r})"


_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def _blamed_field(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, FieldInfo] | None:
    blamed = None
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not isinstance(part, str) or fields is None or part not in fields:
            break
        info = fields[part]
        if blamed is None or _expectation(info.annotation, info.metadata):
            blamed = (part, info)
        current = _inner_model(info.annotation)
    return blamed


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        if typing.get_origin(candidate) is Annotated:
            return _inner_model(typing.get_args(candidate)[0])
    return None


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
