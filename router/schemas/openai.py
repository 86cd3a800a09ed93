"""OpenAI's chat completion and completion requests as typed models, with OpenAI's names (and
vLLM's extras): the routes parse bodies with them and `/openapi.json` publishes their schemas.

Nulls mean absent and unknown fields are ignored, as TGI reads OpenAI bodies. Types are JSON's,
without coercion; ranges are `SamplingParams`' to check (`router/openai_params.py` maps a
request onto it), except the counts bounded by a router limit (`--max-best-of`,
`--max-top-n-tokens`), which read the limits from the validation context. Messages, tools,
`tool_choice` and `response_format` are declared here for the spec and checked by their own
parsers (`chat_template.py`, `tools.py`, `validation.guided_decoding`), whose errors say where
in a conversation or a tool the fault is.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from shardline.router.errors import ValidationError
from shardline.router.schemas.common import (
    Expect,
    FiniteFloat,
    StrictBool,
    StrictInt,
    StrictStr,
    StrList,
    TokenIds,
    error_message,
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
            raise PydanticCustomError(
                _LIMIT_ERROR,
                "must be {allowed}. Given: {given}",
                {"allowed": allowed, "given": repr(value)},
            )
        return handler(value)

    return Annotated[int, Field(ge=low), WrapValidator(check)]


_LIMIT_ERROR = "router_limit"
SamplesPerPrompt = _up_to_limit(1, "max_best_of", "--max-best-of")
AlternativesPerToken = _up_to_limit(0, "max_top_n_tokens", "--max-top-n-tokens")


def described_as(shape: Any) -> Any:
    """A field checked by its own parser, described in the spec as `shape`, written out in
    place (TGI's spec names no component for these shapes)."""
    schema = TypeAdapter(shape).json_schema()
    return Annotated[Any, WithJsonSchema(inlined(schema, schema.pop("$defs", {})))]


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


# ---- shapes their own parsers check ------------------------------------------------------------


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: str | dict[str, Any] = Field(description="JSON text of an object, or the object")


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="Assistant messages only")
    tool_call_id: str | None = Field(None, description="Tool messages: the call answered")


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of an object")


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(OpenAIModel):
    type: Literal["function"] = "function"
    function: dict[str, str] = Field(description='{"name": <a tool\'s name>}')


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceFunction


class ResponseFormat(OpenAIModel):
    """OpenAI's `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema":
    {"schema": ...}}`; TGI's grammar shapes (`json`, `regex` with a `value`) are read too."""

    type: Literal["text", "json_object", "json_schema", "json", "regex"]
    json_schema: dict[str, Any] | None = None
    value: Any = None


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
    logit_bias: described_as(dict[str, float] | None) = Field(
        None, description="Token id (as a string) -> bias added to its logit, in [-100, 100]"
    )
    response_format: described_as(ResponseFormat | None) = Field(
        None, description="Constrained output"
    )


class ChatRequest(OpenAIRequest):
    messages: described_as(Annotated[list[ChatMessage], Field(min_length=1)])
    max_completion_tokens: StrictInt | None = Field(None, description="Wins over `max_tokens`")
    logprobs: Boolean | None = None
    top_logprobs: AlternativesPerToken | None = Field(None, description="Needs `logprobs`")
    tools: described_as(list[Tool] | None) = Field(
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
    first field that does not fit."""
    try:
        return model.model_validate(body, context=limits)
    except pydantic.ValidationError as error:
        first = error.errors(include_url=False)[0]
        if first["type"] == _LIMIT_ERROR:
            raise ValidationError(f"`{first['loc'][0]}` {first['msg']}") from None
        raise ValidationError(error_message(model, first)) from None
