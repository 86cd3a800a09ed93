"""OpenAI's chat completion and completion requests as typed models, with OpenAI's names (and
vLLM's extras): the routes parse bodies with them and `/openapi.json` publishes their schemas.

Nulls mean absent and unknown fields are ignored, as TGI reads OpenAI bodies. Types are JSON's,
without coercion; ranges are `SamplingParams`' to check (`router/openai_params.py` maps a
request onto it), except the counts bounded by a router limit (`--max-best-of`,
`--max-top-n-tokens`), which read the limits from the validation context. Messages, tools,
`tool_choice` and `response_format` are typed here too: a 422 names the place in the
conversation or the tool ("`messages[1]`.tool_calls[0].id must be a string"); what is a rule
rather than a shape (a tool's schema usable as a grammar, `tool_choice` naming a tool) is
`tools.py`'s to check.
"""

from __future__ import annotations

import contextlib
import re
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)

from shardline.router import json_limits
from shardline.router.errors import ToolError, ValidationError
from shardline.router.schemas.common import (
    Expect,
    FiniteFloat,
    GrammarField,
    StrictBool,
    StrictInt,
    StrictStr,
    StrList,
    TokenIds,
    error_message,
    refuse,
)

Request = TypeVar("Request", bound=BaseModel)
Boolean = Annotated[StrictBool, Expect("a boolean")]
Stop = Annotated[StrictStr | StrList, Expect("a string or a list of strings")]


def _up_to_limit(low: int, limit: str, flag: str) -> Any:
    """An integer from `low` up to the router's `limit` (a `ValidationLimits` field, set by
    `flag`), read from the validation context; a bool is no integer."""

    def check(value: Any, handler: pydantic.ValidatorFunctionWrapHandler, info: ValidationInfo):
        bound = getattr(info.context, limit, None)
        if type(value) is not int or value < low or (bound is not None and value > bound):
            lowest = "> 0" if low == 1 else f">= {low}"
            allowed = lowest if bound is None else f"{lowest} and <= {bound} ({flag})"
            refuse(f"must be {allowed}. Given: {value!r}")
        return handler(value)

    return Annotated[int, Field(ge=low), WrapValidator(check)]


SamplesPerPrompt = _up_to_limit(1, "max_best_of", "--max-best-of")
AlternativesPerToken = _up_to_limit(0, "max_top_n_tokens", "--max-top-n-tokens")


def described_as(shape: Any) -> Any:
    """A field of `shape` whose schema the spec writes out in place (TGI's spec names no
    component for these shapes)."""
    schema = TypeAdapter(shape).json_schema()
    return Annotated[shape, WithJsonSchema(inlined(schema, schema.pop("$defs", {})))]


def inlined(node: Any, definitions: dict[str, Any]) -> Any:
    """`node` with its references to `definitions` replaced by what they define."""
    if isinstance(node, list):
        return [inlined(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    name = node.get("$ref", "").rsplit("/", 1)[-1]
    if name in definitions:
        return inlined(definitions[name], definitions)
    return {key: inlined(value, definitions) for key, value in node.items()}


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# ---- conversations, tools and constrained output ------------------------------------------------

AString = Annotated[StrictStr, Expect("a string")]
TEXT_PART = '{"type": "text", "text": <string>}'
TOOL_CALL = '{"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}'
TOOL = '{"type": "function", "function": {...}}'
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _refuse_images(part: Any) -> Any:
    if isinstance(part, dict) and part.get("type") == "image_url":
        refuse("is an image: images are not supported by this model")
    return part


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: AString

    _no_images = model_validator(mode="before")(_refuse_images)


def _json_object(arguments: str | dict[str, Any]) -> dict[str, Any]:
    """A call's arguments as an object, as chat templates read them (clients send JSON text)."""
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json_limits.loads(arguments)
    if not isinstance(arguments, dict):
        refuse("must be a JSON object or a string holding one")
    return arguments


class FunctionCall(OpenAIModel):
    name: AString
    arguments: Annotated[StrictStr | dict[str, Any], AfterValidator(_json_object)] = Field(
        description="JSON text of an object, or the object"
    )


class ToolCall(OpenAIModel):
    id: AString
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Annotated[StrictStr, Field(min_length=1), Expect("a string")]
    content: (
        Annotated[
            StrictStr | list[Annotated[TextPart, Expect(TEXT_PART)]],
            Expect("a string or a list of content parts"),
        ]
        | None
    ) = None
    name: AString | None = None
    tool_calls: (
        Annotated[list[Annotated[ToolCall, Expect(TOOL_CALL)]], Expect("a list of tool calls")]
        | None
    ) = Field(None, description="Assistant messages only")
    tool_call_id: AString | None = Field(None, description="Tool messages: the call answered")

    @model_validator(mode="after")
    def _calls_need_an_assistant(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            refuse("has tool_calls: only assistant messages call tools")
        if self.content is None and not self.tool_calls:
            refuse("has no content: it must be a string or a list of content parts")
        return self


def _tool_name(name: str) -> str:
    if not TOOL_NAME.fullmatch(name):
        refuse(f"must match [A-Za-z0-9_-]{{1,64}}. Given: {name!r}")
    return name


class FunctionDefinition(OpenAIModel):
    name: Annotated[StrictStr, AfterValidator(_tool_name), Expect("a string")] = Field(
        json_schema_extra={"pattern": TOOL_NAME.pattern}
    )
    description: AString | None = None
    parameters: Annotated[dict[str, Any], Expect("a JSON schema of type object")] | None = Field(
        None,
        validation_alias=AliasChoices("parameters", "arguments"),
        description="JSON schema of an object (TGI reads `arguments` too)",
    )


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(OpenAIModel):
    name: AString


class ToolChoiceFunction(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Annotated[
    StrictStr | ToolChoiceFunction,
    Expect(
        "'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": <tool name>}}'
    ),
]


def _token_id(key: str) -> str:
    if not (key.isascii() and key.isdigit()):
        refuse(f"keys must be token ids; got {key!r}")
    return key


LogitBias = Annotated[
    dict[Annotated[StrictStr, AfterValidator(_token_id)], FiniteFloat],
    Expect("an object mapping token ids to numbers"),
]


# ---- the requests ------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: Boolean | None = None


class Sampling(OpenAIModel):
    """What every OpenAI API (the Responses API too) passes to `SamplingParams` as is."""

    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None


class VllmSampling(Sampling):
    """OpenAI's and vLLM's further `SamplingParams` fields, passed on as they are."""

    top_k: StrictInt | None = Field(None, description="0 or -1: off")
    min_p: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    seed: StrictInt | None = None
    stop: Stop | None = None
    stop_token_ids: TokenIds | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: Boolean | None = None
    skip_special_tokens: Boolean | None = None
    cache_salt: StrictStr | None = Field(
        None,
        description="Prefix-cache isolation (vLLM's): only requests of the same non-empty salt "
        "share cached prompt blocks",
    )


class OpenAIRequest(VllmSampling):
    """What chat completions and completions share."""

    model: StrictStr | None = Field(None, description="Accepted, unused: one model")
    user: StrictStr | None = None
    stream: Boolean | None = None
    stream_options: Annotated[StreamOptions, Expect('{"include_usage": <boolean>}')] | None = None
    max_tokens: StrictInt | None = None
    n: SamplesPerPrompt | None = Field(
        None, description="Samples per prompt (at most --max-best-of); needs sampling"
    )
    logit_bias: described_as(LogitBias | None) = Field(
        None, description="Token id (as a string) -> bias added to its logit, in [-100, 100]"
    )
    response_format: described_as(GrammarField | None) = Field(
        None, description="Constrained output"
    )


class ChatRequest(OpenAIRequest):
    messages: described_as(
        Annotated[list[ChatMessage], Field(min_length=1), Expect("a non-empty list of messages")]
    )
    max_completion_tokens: StrictInt | None = Field(None, description="Wins over `max_tokens`")
    logprobs: Boolean | None = None
    top_logprobs: AlternativesPerToken | None = Field(None, description="Needs `logprobs`")
    tools: described_as(list[Annotated[Tool, Expect(TOOL)]] | None) = Field(
        None, description="The answer is one call, its arguments constrained to the tool's schema"
    )
    tool_choice: described_as(ToolChoice | None) = Field(
        None,
        description='"auto" (a tool or TGI\'s no_tool, then a text answer; the default), "none", '
        '"required", or a function by name',
    )
    tool_prompt: StrictStr | None = Field(
        None, description="Appended to the last message with the tools"
    )


class CompletionRequest(OpenAIRequest):
    prompt: Annotated[StrictStr | StrList, Expect("a string or a list of strings")]
    suffix: StrictStr | None = Field(None, description="Not supported: a non-empty one is a 422")
    echo: Boolean | None = Field(None, description="The prompt comes back before the text")
    logprobs: AlternativesPerToken | None = Field(
        None, description="Alternatives per token (OpenAI's legacy logprobs)"
    )
    best_of: SamplesPerPrompt | None = Field(
        None,
        description="Samples per prompt (at most --max-best-of), of which the `n` of highest "
        "mean logprob answer; not when streaming",
    )


OPENAI_REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "ChatRequest": ChatRequest,
    "CompletionRequest": CompletionRequest,
}


def parse_openai(model: type[Request], body: Any, limits: Any) -> Request:
    """`body` as `model`, the router's `ValidationLimits` bounding the counts; a 422 naming the
    first place that does not fit (a `tool_error` for the tools)."""
    try:
        return model.model_validate(body, context=limits)
    except pydantic.ValidationError as error:
        errors = error.errors(include_url=False)
        refusal = ToolError if errors[0]["loc"][:1] in _TOOL_FIELDS else ValidationError
        raise refusal(error_message(model, errors)) from None


_TOOL_FIELDS = (("tools",), ("tool_choice",))
