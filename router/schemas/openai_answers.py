"""OpenAI's chat completion and completion answers (and their chunks, `/v1/models`' and
`/chat_tokenize`'s), as `/openapi.json` describes them; the routes write them. Names and
required fields are those of TGI's spec."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from shardline.router.schemas.tgi_responses import Count, TokenizeResponse

Timestamp = Annotated[int, Field(ge=0, json_schema_extra={"format": "int64"})]
ChatFinish = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: Count = Field(description="Prompt tokens found in the prefix cache")


class Usage(BaseModel):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count
    prompt_tokens_details: PromptTokensDetails | None = None


class TextMessage(BaseModel):
    role: str
    content: str
    tool_call_id: str | None = None


class ChatCompletionTopLogprob(BaseModel):
    token: str
    logprob: float


class ChatCompletionLogprob(ChatCompletionTopLogprob):
    top_logprobs: list[ChatCompletionTopLogprob]


class ChatCompletionLogprobs(BaseModel):
    content: list[ChatCompletionLogprob]


class ChatCompletionComplete(BaseModel):
    index: Count
    message: TextMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: ChatFinish


class ChatCompletionChoice(BaseModel):
    index: Count
    delta: TextMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: ChatFinish | None = None


class _Answer(BaseModel):
    id: str
    created: Timestamp
    model: str
    system_fingerprint: str


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionComplete]
    usage: Usage


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs; with echo the prompt's tokens come first"""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[Annotated[int, Field(ge=0)]]


class CompletionComplete(BaseModel):
    index: Count
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["", "stop", "length"] = Field(
        description="Empty in the stream until the last chunk"
    )


class CompletionFinal(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionComplete]
    usage: Usage


class Chunk(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionComplete]
    usage: Usage | None = None


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"]
    created: Timestamp
    owned_by: str


class ChatTokenizeResponse(BaseModel):
    tokenize_response: TokenizeResponse
    templated_text: str


OPENAI_ANSWER_MODELS = {
    model.__name__: model
    for model in (
        ChatCompletion,
        ChatCompletionChunk,
        CompletionFinal,
        Chunk,
        ModelInfo,
        ChatTokenizeResponse,
    )
}
