"""OpenAI's Responses API request (text in, text out) as a typed model, with OpenAI's names:
`router/responses_route.py` parses bodies with it and `/openapi.json` publishes its schema.

Nulls mean absent and unknown fields are ignored. `input` is declared here for the spec and
checked by the route, whose errors name the item at fault. The fields this server cannot honour
are declared so that the route refuses them (a 422), never ignores them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SkipValidation

from shardline.router.schemas.common import Expect, StrictInt, StrictStr, StrList
from shardline.router.schemas.openai import Boolean, OpenAIModel, Sampling, described_as

ResponsesRole = Literal["user", "assistant", "system", "developer"]


class ResponsesTextPart(OpenAIModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class ResponsesInputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    role: ResponsesRole
    content: described_as(str | list[ResponsesTextPart])


class TextOptions(OpenAIModel):
    format: dict[str, Any] = Field(
        description='{"type": "text" | "json_object" | "json_schema", "schema": ...}: '
        "constrained output"
    )


_NOT_STORED = "Not supported (nothing is stored): a 422"
_REFUSED = "Not supported: a 422"


class ResponsesRequest(Sampling):
    model: StrictStr | None = None
    input: SkipValidation[str | list[ResponsesInputMessage]] = Field(
        description="A string, or a non-empty list of message items"
    )
    instructions: Annotated[StrictStr, Expect("a string")] | None = Field(
        None, description="A system message before `input`"
    )
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    stream: Boolean | None = None
    text: described_as(TextOptions | None) = None
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
