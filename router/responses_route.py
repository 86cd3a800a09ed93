"""OpenAI's Responses API, text in and text out: POST /v1/responses.

`input` (a string, or message items whose content is text) and `instructions` (a system
message first) go through the chat route's template and validation; `max_output_tokens`,
`temperature`, `top_p` and `text.format` map onto `SamplingParams` (the request's model is
`router/schemas/responses.py`). The answer is a `response` object with one assistant message
(`router/schemas/responses_answer.py`); streamed, it is OpenAI's event sequence (`response.created`
... `response.completed`, or `response.incomplete` when cut by `max_output_tokens`), each SSE
event with its `event:` line and a `sequence_number`. Nothing is stored: `store: true`,
`previous_response_id`, tools and non-text items are a 422, never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from shardline.router.chat_template import Message, content_text, render_chat
from shardline.router.errors import RouterError, ValidationError
from shardline.router.http import RouterContext, read_json
from shardline.router.openai_params import sampling_params
from shardline.router.openai_serving import OpenAIJob, Usage, serve
from shardline.router.request_types import Finished, FinishReason, StreamEvent, ValidRequest
from shardline.router.schemas.common import Grammar
from shardline.router.schemas.openai import parse_openai
from shardline.router.schemas.responses import ROLES, ResponsesRequest, TextOptions
from shardline.router.schemas.responses_answer import (
    OutputText,
    Response,
    ResponsesOutputMessage,
    ResponsesUsage,
)
from shardline.router.validation import guided_decoding

# Asked for, these change the answer in ways this server does not offer.
_UNSUPPORTED = {
    "previous_response_id": "responses are not stored",
    "conversation": "responses are not stored",
    "background": "background responses are not supported",
    "prompt": "prompt templates are not supported",
    "reasoning": "reasoning options are not supported",
    "top_logprobs": "logprobs are not supported on /v1/responses",
    "max_tool_calls": "tools are not supported on /v1/responses",
}


async def responses(request: web.Request) -> web.StreamResponse:
    return await serve(request, _job, _present, await read_json(request))


RESPONSES_ROUTES = [web.post("/v1/responses", responses)]


# ---- the request -------------------------------------------------------------------------------


def _job(ctx: RouterContext, body: Any) -> OpenAIJob:
    request = parse_openai(ResponsesRequest, body, ctx.validator.limits)
    _reject_unsupported(request)
    messages = _messages(request)
    return OpenAIJob(
        chat=True,
        prompts=[render_chat(ctx.validator.tokenizer, messages)],
        params=sampling_params(
            request, **guided_decoding(_text_format(request.text), "text.format")
        ),
        stream=bool(request.stream),
        request_fields=request.model_dump(exclude_none=True, exclude={"input"}),
    )


def _reject_unsupported(request: ResponsesRequest) -> None:
    for name, reason in _UNSUPPORTED.items():
        if getattr(request, name) is not None:
            raise ValidationError(f"`{name}` is not supported: {reason}")
    if request.store:
        raise ValidationError("`store` must be false: this server does not store responses")
    if request.tools:
        raise ValidationError("`tools` are not supported on /v1/responses")
    if request.tool_choice not in (None, "none", "auto"):
        raise ValidationError("`tool_choice` needs `tools`, which /v1/responses does not support")
    if request.truncation not in (None, "disabled"):
        raise ValidationError('`truncation` must be "disabled"')
    if request.include:
        raise ValidationError("`include` is not supported: there is nothing more to include")


def _messages(request: ResponsesRequest) -> list[Message]:
    """The chat messages of `instructions` and `input`."""
    system = [{"role": "system", "content": request.instructions}] if request.instructions else []
    if isinstance(request.input, str):
        return [*system, {"role": "user", "content": request.input}]
    return system + [
        {"role": ROLES[item.role], "content": content_text(item.content)} for item in request.input
    ]


def _text_format(text: TextOptions | None) -> Grammar | None:
    """`text.format` as a constrained output: json_schema's schema is at the format's top."""
    if text is None:
        return None
    if text.format.type == "json_schema":
        return Grammar(type="json_schema", value={"schema": text.format.format_schema})
    return Grammar(type=text.format.type)


# ---- the answer --------------------------------------------------------------------------------


def _present(ctx: RouterContext, job: OpenAIJob, requests: list[ValidRequest]) -> ResponsePresenter:
    return ResponsePresenter(ctx, job)


class ResponsePresenter:
    def __init__(self, ctx: RouterContext, job: OpenAIJob) -> None:
        self._job = job
        self._model = ctx.info["model_id"]
        self._id = f"resp_{uuid.uuid4().hex}"
        self._item_id = f"msg_{uuid.uuid4().hex}"
        self._created_at = int(time.time())
        self._sequence = 0

    def answer(self, results: list[list[StreamEvent]], usage: Usage) -> dict[str, Any]:
        finished = results[0][-1].finished
        assert finished is not None
        return self._response(finished, usage)

    def opening(self) -> list[bytes]:
        pending = self._response(None, None)
        part = OutputText(text="").model_dump()
        return [
            self._event("response.created", response=pending),
            self._event("response.in_progress", response=pending),
            self._event(
                "response.output_item.added", output_index=0, item=self._item(None, "").model_dump()
            ),
            self._event("response.content_part.added", **self._where(), part=part),
        ]

    def events(self, prompt_index: int, event: StreamEvent) -> list[bytes]:
        if not event.text:  # the token released no text yet
            return []
        return [self._event("response.output_text.delta", **self._where(), delta=event.text)]

    def closing(self, finals: list[StreamEvent], usage: Usage) -> list[bytes]:
        finished = finals[0].finished
        assert finished is not None
        part = OutputText(text=finished.generated_text).model_dump()
        done = self._response(finished, usage)
        return [
            self._event(
                "response.output_text.done", **self._where(), text=part["text"], logprobs=[]
            ),
            self._event("response.content_part.done", **self._where(), part=part),
            self._event("response.output_item.done", output_index=0, item=done["output"][0]),
            self._event(f"response.{done['status']}", response=done),
        ]

    def failure(self, error: RouterError) -> bytes:
        return self._event("error", code=error.error_type, message=str(error), param=None)

    # ---- bodies ----

    def _response(self, finished: Finished | None, usage: Usage | None) -> dict[str, Any]:
        fields = self._job.request_fields
        status = "in_progress" if finished is None else _status(finished)
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return Response(
            id=self._id,
            created_at=self._created_at,
            status=status,
            incomplete_details=incomplete,
            instructions=fields.get("instructions"),
            max_output_tokens=fields.get("max_output_tokens"),
            metadata=fields.get("metadata") or {},
            model=self._model,
            output=[] if finished is None else [self._item(finished, finished.generated_text)],
            parallel_tool_calls=fields.get("parallel_tool_calls", True),
            temperature=self._job.params.temperature,
            text=fields.get("text") or {"format": {"type": "text"}},
            tool_choice=fields.get("tool_choice", "auto"),
            top_p=self._job.params.top_p,
            usage=None if usage is None else _usage(usage),
            user=fields.get("user"),
        ).model_dump()

    def _item(self, finished: Finished | None, text: str) -> ResponsesOutputMessage:
        return ResponsesOutputMessage(
            id=self._item_id,
            status="in_progress" if finished is None else _status(finished),
            content=[] if finished is None else [OutputText(text=text)],
        )

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._item_id, "output_index": 0, "content_index": 0}

    def _event(self, kind: str, **payload: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **payload}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _status(finished: Finished) -> str:
    return "incomplete" if finished.reason is FinishReason.LENGTH else "completed"


def _usage(usage: Usage) -> ResponsesUsage:
    return ResponsesUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details={"cached_tokens": usage.cached_tokens},
        output_tokens=usage.completion_tokens,
        output_tokens_details={"reasoning_tokens": 0},
        total_tokens=usage.total_tokens,
    )
