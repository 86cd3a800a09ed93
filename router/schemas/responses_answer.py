"""What /v1/responses answers (OpenAI's Responses API, text): the `response` object, its message
item and the stream's events. `router/responses_route.py` builds its bodies with these models
and `/openapi.json` publishes their schemas, every field required as every answer carries it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt

ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class AnswerModel(BaseModel):
    model_config = ConfigDict(
        json_schema_mode_override="serialization", json_schema_serialization_defaults_required=True
    )


class OutputText(AnswerModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] = []


class ResponsesOutputMessage(AnswerModel):
    type: Literal["message"] = "message"
    id: str
    status: ResponseStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ResponsesUsage(AnswerModel):
    input_tokens: NonNegativeInt
    input_tokens_details: dict[str, int]
    output_tokens: NonNegativeInt
    output_tokens_details: dict[str, int]
    total_tokens: NonNegativeInt


class Response(AnswerModel):
    id: str
    object: Literal["response"] = "response"
    created_at: NonNegativeInt
    status: ResponseStatus
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, Any]
    model: str
    output: list[ResponsesOutputMessage]
    parallel_tool_calls: bool
    store: Literal[False] = False
    temperature: float
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]] = []
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponsesUsage | None
    user: str | None


class ResponseStreamEvent(AnswerModel):
    """One `event: <type>` / `data: <this>` SSE event: response.created, response.in_progress,
    response.output_item.added, response.content_part.added, response.output_text.delta...,
    response.output_text.done, response.content_part.done, response.output_item.done, then
    response.completed (response.incomplete when cut by max_output_tokens); error on a failure.
    """

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: NonNegativeInt


RESPONSES_ANSWER_MODELS: dict[str, type[BaseModel]] = {
    "ResponsesOutputMessage": ResponsesOutputMessage,
    "Response": Response,
    "ResponseStreamEvent": ResponseStreamEvent,
}
