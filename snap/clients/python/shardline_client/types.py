"""Request options and typed responses, following TGI's OpenAPI schema.

Response models ignore fields they do not know, so newer servers stay readable. Names follow
the `text_generation` client where it has them (`Response`, `InputToken`, `ChatComplete`...),
with the OpenAPI schema's names as aliases (`PrefillToken`, `ChatCompletion`...).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, with_config
from typing_extensions import TypedDict

# ---------------------------------------------------------------- request pieces


class GrammarType(str, Enum):
    Json = "json"
    Regex = "regex"
    JsonSchema = "json_schema"


class Grammar(BaseModel):
    """Constrains generation to a regex or a JSON schema (TGI's `grammar`/`response_format`)."""

    type: GrammarType
    value: str | dict[str, Any]


class MessageChunk(BaseModel):
    """One part of a multi-part message: `{"type": "text", "text"}` or an `image_url`."""

    type: str
    text: str | None = None
    image_url: dict[str, str] | None = None


class FunctionDefinition(BaseModel):
    """A tool's function; OpenAI's `parameters` is read as TGI's `arguments` (its JSON schema)."""

    name: str
    arguments: Any = Field(None, validation_alias=AliasChoices("arguments", "parameters"))
    description: str | None = None


class ToolCall(BaseModel):
    id: str
    type: str = "function"
    function: FunctionDefinition


class Message(BaseModel):
    """A chat message, sent in `messages` and returned in a completion's choices."""

    role: str
    content: str | list[MessageChunk] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class Tool(BaseModel):
    type: str = "function"
    function: FunctionDefinition


class StreamOptions(BaseModel):
    include_usage: bool = False


class VllmOptions(TypedDict, total=False):
    """vLLM's sampling extras, accepted by Shardline next to TGI's parameters."""

    presence_penalty: float | None
    min_p: float | None
    min_tokens: int | None
    ignore_eos: bool | None
    skip_special_tokens: bool | None
    stop_token_ids: list[int] | None


@with_config(ConfigDict(extra="forbid"))
class GenerateStreamOptions(VllmOptions, total=False):
    """Keyword arguments of `generate_stream`: TGI's `parameters` plus vLLM's extras."""

    do_sample: bool
    max_new_tokens: int | None
    repetition_penalty: float | None
    frequency_penalty: float | None
    return_full_text: bool
    seed: int | None
    stop_sequences: list[str] | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    truncate: int | None
    typical_p: float | None
    watermark: bool
    top_n_tokens: int | None
    grammar: Grammar | None
    adapter_id: str | None


@with_config(ConfigDict(extra="forbid"))
class GenerateOptions(GenerateStreamOptions, total=False):
    """Keyword arguments of `generate`: those of `generate_stream` plus best-of and prefill."""

    best_of: int | None
    decoder_input_details: bool


@with_config(ConfigDict(extra="forbid"))
class ChatOptions(VllmOptions, total=False):
    """Keyword arguments of `chat`: OpenAI's chat request fields plus vLLM's extras."""

    model: str
    repetition_penalty: float | None
    frequency_penalty: float | None
    logit_bias: list[float] | None
    logprobs: bool | None
    top_logprobs: int | None
    max_tokens: int | None
    n: int | None
    seed: int | None
    stop: list[str] | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    tools: list[Tool] | None
    tool_choice: str | dict[str, Any] | None
    tool_prompt: str | None
    response_format: Grammar | None
    stream_options: StreamOptions | None


# ---------------------------------------------------------------- /generate responses


class FinishReason(str, Enum):
    Length = "length"
    EndOfSequenceToken = "eos_token"
    StopSequence = "stop_sequence"


class InputToken(BaseModel):
    """A prompt token with its logprob (None for the first one)."""

    id: int
    text: str
    logprob: float | None = None


PrefillToken = InputToken


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class _Sequence(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class BestOfSequence(_Sequence):
    generated_text: str


class Details(_Sequence):
    best_of_sequences: list[BestOfSequence] | None = None


class Response(BaseModel):
    """The answer of `generate` (TGI's `GenerateResponse`)."""

    generated_text: str
    details: Details | None = None


GenerateResponse = Response


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    input_length: int
    seed: int | None = None


class StreamResponse(BaseModel):
    """One token of `generate_stream`; the last one carries `generated_text` and `details`."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


# ---------------------------------------------------------------- /v1/chat/completions


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float


class Logprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class Logprobs(BaseModel):
    content: list[Logprob]


class ChatCompletionComplete(BaseModel):
    index: int
    message: Message
    logprobs: Logprobs | None = None
    finish_reason: str


class ChatComplete(BaseModel):
    """A whole chat completion (OpenAI's `chat.completion` object)."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionComplete]
    usage: Usage


ChatCompletion = ChatComplete


class Function(BaseModel):
    name: str | None = None
    arguments: str


class ChoiceDeltaToolCall(BaseModel):
    index: int
    id: str
    type: str
    function: Function


class ChoiceDelta(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None
    tool_call_id: str | None = None


class Choice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: Logprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion (`chat.completion.chunk`)."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage | None = None
