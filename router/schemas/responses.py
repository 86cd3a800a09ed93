"""OpenAI's Responses API request (text in, text out) as a typed model, with OpenAI's names:
`router/responses_route.py` parses bodies with it and `/openapi.json` publishes its schema.

Nulls mean absent and unknown fields are ignored; a 422 names the input item at fault. The
fields this server cannot honour are declared so that the route refuses them (a 422), never
ignores them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from shardline.router.schemas.common import Expect, StrictInt, StrictStr, StrList, refuse
from shardline.router.schemas.openai import (
    AString,
    Boolean,
    OpenAIModel,
    Sampling,
    described_as,
)

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
"""The roles of input messages, as the chat template names them."""
TEXT_FORMATS = ("text", "json_object", "json_schema")


def _text_parts_only(part: Any) -> Any:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in (None, "input_text", "output_text", "text"):
        refuse(f"must be a text part (type {kind!r} is not supported)")
    return part


class ResponsesTextPart(OpenAIModel):
    type: Literal["input_text", "output_text", "text"]
    text: AString

    _text_only = model_validator(mode="before")(_text_parts_only)


class ResponsesInputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    role: Annotated[Literal[tuple(ROLES)], Expect(f"one of {sorted(ROLES)}")]
    content: described_as(
        Annotated[
            StrictStr | list[ResponsesTextPart], Expect("a string or a list of content parts")
        ]
    )


class TextFormat(OpenAIModel):
    type: Literal[TEXT_FORMATS]
    format_schema: dict[str, Any] | None = Field(
        None, alias="schema", description="With json_schema: the output's JSON schema"
    )


class TextOptions(OpenAIModel):
    format: Annotated[TextFormat, Expect(f"an object whose `type` is one of {TEXT_FORMATS}")]


_NOT_STORED = "Not supported (nothing is stored): a 422"
_REFUSED = "Not supported: a 422"


class ResponsesRequest(Sampling):
    model: StrictStr | None = None
    input: Annotated[
        StrictStr
        | Annotated[
            list[Annotated[ResponsesInputMessage, Expect("a message item")]], Field(min_length=1)
        ],
        Expect("a string or a non-empty list of message items"),
    ] = Field(description="A string, or a non-empty list of message items")
    instructions: Annotated[StrictStr, Expect("a string")] | None = Field(
        None, description="A system message before `input`"
    )
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    stream: Boolean | None = None
    text: Annotated[TextOptions, Expect('{"format": {"type": ...}}')] | None = None
    store: Boolean | None = Field(None, description="Nothing is stored: true is a 422")
    metadata: dict[str, Any] | None = None
    user: StrictStr | None = None
    tools: list[dict[str, Any]] | None = Field(
        None, description="Not supported on this route: a non-empty list is a 422"
    )
    tool_choice: Any = Field(None, description='"none" or "auto" (without tools)')
    parallel_tool_calls: Boolean | None = None
    truncation: StrictStr | None = Field(None, description='"disabled" only')
    include: StrList | None = Field(None, description="Nothing more to include: non-empty is a 422")
    previous_response_id: StrictStr | None = Field(None, description=_NOT_STORED)
    conversation: Any = Field(None, description=_NOT_STORED)
    background: Boolean | None = Field(None, description=_REFUSED)
    prompt: Any = Field(None, description=f"Prompt templates: {_REFUSED}")
    reasoning: Any = Field(None, description=f"Reasoning options: {_REFUSED}")
    top_logprobs: StrictInt | None = Field(None, description=_REFUSED)
    max_tool_calls: StrictInt | None = Field(None, description=_REFUSED)
    service_tier: StrictStr | None = None


RESPONSES_REQUEST_MODELS: dict[str, type[BaseModel]] = {"ResponsesRequest": ResponsesRequest}
