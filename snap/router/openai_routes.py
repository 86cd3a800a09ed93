"""TGI's OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models and
/chat_tokenize, plus /invocations dispatching on the body's shape as TGI does.

Parameters map onto `SamplingParams` (vLLM's names, so vLLM's extras come for free) and every
prompt goes through `Validator.validate`, as for TGI's own routes. Tools are TGI's tool calling
(`router/tools.py`). What this server cannot do (n > 1, logit_bias, echo, suffix) is a 422,
never silently ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from shardline.router.batcher import RequestStream
from shardline.router.chat_template import parse_messages, render_chat
from shardline.router.errors import RouterError, ValidationError
from shardline.router.http import SSE_HEADERS, RouterContext, context, read_json, sse_event
from shardline.router.request_types import Finished, FinishReason, StreamEvent, ValidRequest
from shardline.router.tools import (
    NoToolChosen,
    ToolCalling,
    ToolCallStream,
    parse_tool_calling,
    render_with_tools,
    tool_call,
)
from shardline.router.validation import guided_decoding
from shardline.sampling_params import SamplingParams, SamplingParamsError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Chunker = Callable[[int, StreamEvent], list[dict[str, Any]]]

# SamplingParams checks their types and ranges; the names are vLLM's, as OpenAI clients send.
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
)
_COMMON_FIELDS = (
    *_SAMPLING_FIELDS,
    "model",
    "user",
    "stream",
    "stream_options",
    "max_tokens",
    "n",
    "logit_bias",
    "logprobs",
)
_CHAT_FIELDS = frozenset(
    {
        *_COMMON_FIELDS,
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "tool_prompt",
    }
)
_COMPLETION_FIELDS = frozenset(
    {*_COMMON_FIELDS, "prompt", "echo", "suffix", "best_of", "response_format"}
)
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class _Job:
    """A parsed OpenAI request: one generation per prompt, all with the same parameters."""

    chat: bool
    prompts: list[str]
    params: SamplingParams
    max_tokens: int | None
    stream: bool
    include_usage: bool
    top_logprobs: int | None = None
    """None: no logprobs; else how many alternatives each token gets."""
    tools: ToolCalling | None = None
    without_tools: _Job | None = None
    """With tools: the same request without them, answered when the model picks `no_tool`."""


# ---- routes ------------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _chat_job, await read_json(request))


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _completion_job, await read_json(request))


async def models(request: web.Request) -> web.Response:
    model_id = context(request).info["model_id"]
    model = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": model_id}
    return web.json_response({"object": "list", "data": [model]})


async def chat_tokenize(request: web.Request) -> web.Response:
    ctx = context(request)
    text = _chat_job(ctx, await read_json(request)).prompts[0]
    encoding = await ctx.validator.encode(text, add_special_tokens=False)
    tokens = [
        {"id": token_id, "text": text[start:stop], "start": start, "stop": stop}
        for token_id, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True)
    ]
    return web.json_response({"tokenize_response": tokens, "templated_text": text})


def sagemaker_invocations(compat_generate: Handler) -> Handler:
    """/invocations: a chat body (`messages`), a completion body (`prompt`), else TGI's own."""

    async def invocations(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, dict) and "messages" in body:
            return await _serve(request, _chat_job, body)
        if isinstance(body, dict) and "prompt" in body:
            return await _serve(request, _completion_job, body)
        return await compat_generate(request)

    return invocations


OPENAI_ROUTES = [
    web.post("/v1/chat/completions", chat_completions),
    web.post("/v1/completions", completions),
    web.get("/v1/models", models),
    web.post("/chat_tokenize", chat_tokenize),
]


# ---- parsing -----------------------------------------------------------------------------------


def _chat_job(ctx: RouterContext, body: Any) -> _Job:
    fields = _fields(body, _CHAT_FIELDS)
    _reject_logit_bias(fields)
    messages = parse_messages(fields.get("messages"))
    calling = parse_tool_calling(fields)
    job = _plain_chat_job(ctx, fields, render_chat(ctx.validator.tokenizer, messages))
    if calling is None:
        return job
    return replace(
        job,
        prompts=[render_with_tools(ctx.validator.tokenizer, messages, calling)],
        params=_sampling_params(fields, job.max_tokens, {"guided_json": calling.grammar}),
        tools=calling,
        without_tools=job,
    )


def _plain_chat_job(ctx: RouterContext, fields: dict[str, Any], prompt: str) -> _Job:
    max_tokens = fields.get("max_completion_tokens", fields.get("max_tokens"))
    guided = guided_decoding(fields.get("response_format"), "response_format")
    return _Job(
        chat=True,
        prompts=[prompt],
        params=_sampling_params(fields, max_tokens, guided),
        max_tokens=max_tokens,
        stream=_bool(fields, "stream"),
        include_usage=_include_usage(fields),
        top_logprobs=_top_logprobs(fields, ctx.validator.limits.max_top_n_tokens),
    )


def _completion_job(ctx: RouterContext, body: Any) -> _Job:
    fields = _fields(body, _COMPLETION_FIELDS)
    _reject_unsupported_completion(fields)
    max_tokens = fields.get("max_tokens")
    return _Job(
        chat=False,
        prompts=_prompts(fields.get("prompt"), ctx.validator.limits.max_client_batch_size),
        params=_sampling_params(
            fields, max_tokens, guided_decoding(fields.get("response_format"), "response_format")
        ),
        max_tokens=max_tokens,
        stream=_bool(fields, "stream"),
        include_usage=_include_usage(fields),
    )


def _fields(body: Any, known: frozenset[str]) -> dict[str, Any]:
    """The body's known fields without nulls (null means absent); unknown ones are ignored, as
    TGI ignores them."""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    return {name: value for name, value in body.items() if value is not None and name in known}


def _bool(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be a boolean (got {value!r})")
    return value


def _sampling_params(
    fields: dict[str, Any], max_tokens: Any, guided: dict[str, Any]
) -> SamplingParams:
    n = fields.get("n", 1)
    if type(n) is not int or n != 1:
        raise ValidationError(
            f"`n` must be 1: this server returns one choice per prompt (got {n!r})"
        )
    for name in ("ignore_eos", "skip_special_tokens"):
        _bool(fields, name)
    sampling = {name: fields[name] for name in _SAMPLING_FIELDS if name in fields}
    sampling.update(guided)
    try:
        return SamplingParams(max_tokens=max_tokens, **sampling)
    except SamplingParamsError as error:
        raise ValidationError(str(error)) from error


def _include_usage(fields: dict[str, Any]) -> bool:
    options = fields.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ValidationError('`stream_options` must be {"include_usage": <boolean>}')
    if options and not _bool(fields, "stream"):
        raise ValidationError("`stream_options` is only allowed when `stream` is true")
    return _bool(options, "include_usage")


def _top_logprobs(fields: dict[str, Any], limit: int) -> int | None:
    top = fields.get("top_logprobs")
    if not _bool(fields, "logprobs"):
        if top is not None:
            raise ValidationError("`top_logprobs` requires `logprobs` to be true")
        return None
    top = 0 if top is None else top
    if type(top) is not int or not 0 <= top <= limit:
        raise ValidationError(f"`top_logprobs` must be >= 0 and <= {limit}. Given: {top!r}")
    return top


def _prompts(prompt: Any, limit: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValidationError("`prompt` is required and must be a string or a list of strings")
    if not 0 < len(prompts) <= limit:
        raise ValidationError(
            f"`prompt` must hold between 1 and {limit} prompts (max_client_batch_size). "
            f"Given: {len(prompts)}"
        )
    return prompts


def _reject_unsupported_completion(fields: dict[str, Any]) -> None:
    if fields.get("echo", False) is not False:
        raise ValidationError("`echo` is not supported by this server")
    if fields.get("suffix"):
        raise ValidationError("`suffix` is not supported by this server")
    if "logprobs" in fields:
        raise ValidationError("`logprobs` is not supported on /v1/completions")
    if fields.get("best_of", 1) != 1:
        raise ValidationError("`best_of` must be 1: this server returns one choice per prompt")
    _reject_logit_bias(fields)


def _reject_logit_bias(fields: dict[str, Any]) -> None:
    if fields.get("logit_bias"):
        raise ValidationError("`logit_bias` is not supported by this server")


# ---- serving -----------------------------------------------------------------------------------


async def _serve(
    request: web.Request, job_of: Callable[[RouterContext, Any], _Job], body: Any
) -> web.StreamResponse:
    """Counts the request as TGI's routes do, holds a slot per prompt, answers or streams."""
    ctx = context(request)
    ctx.metrics.request_count.inc()
    started = time.monotonic()
    try:
        job = job_of(ctx, body)
        with contextlib.ExitStack() as slots:
            for _ in job.prompts:
                slots.enter_context(ctx.request_slot())
            try:
                response, succeeded = await _respond(request, ctx, job)
            except NoToolChosen:  # TGI answers again, without tools
                assert job.without_tools is not None
                response, succeeded = await _respond(request, ctx, job.without_tools)
    except RouterError as error:
        ctx.metrics.request_failure.inc(err=error.error_type)
        raise
    if succeeded:
        ctx.metrics.request_success.inc()
        ctx.metrics.request_duration.observe(time.monotonic() - started)
    return response


async def _respond(
    request: web.Request, ctx: RouterContext, job: _Job
) -> tuple[web.StreamResponse, bool]:
    requests = await _validate(ctx, job)
    if job.stream:
        return await _stream(request, ctx, job, requests)
    return await _answer(ctx, job, requests), True


async def _validate(ctx: RouterContext, job: _Job) -> list[ValidRequest]:
    started = time.monotonic()
    requests = [
        await ctx.validator.validate(
            prompt,
            job.params,
            max_new_tokens=job.max_tokens,
            top_n_tokens=job.top_logprobs or 0,
            add_special_tokens=not job.chat,  # the chat template wrote the special tokens
        )
        for prompt in job.prompts
    ]
    ctx.metrics.request_validation_duration.observe(time.monotonic() - started)
    for valid in requests:
        ctx.metrics.request_input_length.observe(valid.input_length)
        ctx.metrics.request_max_new_tokens.observe(valid.max_new_tokens)
    return requests


async def _answer(ctx: RouterContext, job: _Job, requests: list[ValidRequest]) -> web.Response:
    streams = [ctx.batcher.submit(valid) for valid in requests]
    tasks = [asyncio.ensure_future(stream.collect()) for stream in streams]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        _cancel(streams, tasks)
    choices = [_choice(job, index, events) for index, events in enumerate(results)]
    finished = [events[-1].finished for events in results]
    body = {**_header(ctx, job, chunk=False), "choices": choices, "usage": _usage(finished)}
    return web.json_response(body)


async def _stream(
    request: web.Request, ctx: RouterContext, job: _Job, requests: list[ValidRequest]
) -> tuple[web.StreamResponse, bool]:
    """One chunk per token; an error before the first token is an HTTP error, after it an event.

    Returns the response and whether the request succeeded.
    """
    streams = [ctx.batcher.submit(valid) for valid in requests]
    events = _merge(streams)
    header = _header(ctx, job, chunk=True)
    chunks_of = _chunker(job, header)
    response = web.StreamResponse(headers=SSE_HEADERS)
    finished: list[Finished] = []
    try:
        item = await anext(events)
        chunks = chunks_of(*item)
        while not chunks:  # tool calls: nothing is sent before the tool's name is known
            item = await anext(events)
            chunks = chunks_of(*item)
        await response.prepare(request)
        while item is not None:
            index, event = item
            for chunk in chunks:
                await response.write(sse_event(chunk))
            if event.finished is not None:
                finished.append(event.finished)
            try:
                item = await anext(events, None)
                chunks = [] if item is None else chunks_of(*item)
            except RouterError as error:
                ctx.metrics.request_failure.inc(err=error.error_type)
                await response.write(sse_event(error.to_json()))
                return response, False
        if job.include_usage:
            await response.write(sse_event({**header, "choices": [], "usage": _usage(finished)}))
        await response.write(_DONE)
    except ConnectionError:
        ctx.metrics.request_failure.inc(err="disconnected")
        return response, False
    finally:
        await events.aclose()
        _cancel(streams, [])
    return response, True


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """The events of every stream as they come, each with its stream's index."""
    pending = {asyncio.ensure_future(anext(stream)): index for index, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                event = task.result()
                yield index, event
                if event.finished is None:
                    pending[asyncio.ensure_future(anext(streams[index]))] = index
    finally:
        for task in pending:
            task.cancel()


def _cancel(streams: list[RequestStream], tasks: list[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for stream in streams:
        stream.cancel()


# ---- response bodies ---------------------------------------------------------------------------


def _header(ctx: RouterContext, job: _Job, chunk: bool) -> dict[str, Any]:
    if job.chat:
        prefix, kind = "chatcmpl", "chat.completion.chunk" if chunk else "chat.completion"
    else:
        prefix, kind = "cmpl", "text_completion"
    info = ctx.info
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": info["model_id"],
        "system_fingerprint": f"{info['version']}-{info.get('docker_label') or 'native'}",
    }


def _finish_reason(finished: Finished | None) -> str | None:
    if finished is None:
        return None
    return "length" if finished.reason is FinishReason.LENGTH else "stop"


def _usage(finished: list[Finished | None]) -> dict[str, int]:
    done = [f for f in finished if f is not None]
    prompt = sum(f.input_length for f in done)
    completion = sum(f.generated_tokens for f in done)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _choice(job: _Job, index: int, events: list[StreamEvent]) -> dict[str, Any]:
    finished = events[-1].finished
    if finished is None:
        raise RuntimeError("a finished request has no final event")
    if not job.chat:
        text, reason = finished.generated_text, _finish_reason(finished)
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    message: dict[str, Any] = {"role": "assistant", "content": finished.generated_text}
    if job.tools is not None:
        message = {"role": "assistant", "tool_calls": [tool_call(finished.generated_text)]}
    return {
        "index": index,
        "message": message,
        "logprobs": _logprobs(job, events),
        "finish_reason": _finish_reason(finished),
    }


def _chunker(job: _Job, header: dict[str, Any]) -> Chunker:
    """What to send for each event: one chunk, or for tool calls none while buffering."""
    if not job.chat:
        return lambda index, event: [_completion_chunk(header, index, event)]
    if job.tools is None:
        return lambda index, event: [
            _chat_chunk(job, header, index, {"role": "assistant", "content": event.text}, [event])
        ]
    calls = ToolCallStream()
    held: list[StreamEvent] = []

    def tool_chunks(index: int, event: StreamEvent) -> list[dict[str, Any]]:
        held.append(event)
        delta = calls.push(event.text, final=event.finished is not None)
        if delta is None:
            return []
        chunk = _chat_chunk(job, header, index, delta, list(held))
        held.clear()
        return [chunk]

    return tool_chunks


def _completion_chunk(header: dict[str, Any], index: int, event: StreamEvent) -> dict[str, Any]:
    """TGI's completion chunks carry finish_reason "" until the last one."""
    choice = {"index": index, "text": event.text, "logprobs": None}
    return {
        **header,
        "choices": [{**choice, "finish_reason": _finish_reason(event.finished) or ""}],
    }


def _chat_chunk(
    job: _Job, header: dict[str, Any], index: int, delta: dict[str, Any], events: list[StreamEvent]
) -> dict[str, Any]:
    """A chat chunk for `events` (the last one may finish the answer)."""
    choice = {
        "index": index,
        "delta": delta,
        "logprobs": _logprobs(job, events),
        "finish_reason": _finish_reason(events[-1].finished),
    }
    return {**header, "choices": [choice], **({"usage": None} if job.include_usage else {})}


def _logprobs(job: _Job, events: list[StreamEvent]) -> dict[str, Any] | None:
    if job.top_logprobs is None:
        return None
    return {
        "content": [
            {
                "token": event.token.text,
                "logprob": event.token.logprob,
                "top_logprobs": [
                    {"token": top.text, "logprob": top.logprob} for top in event.top_tokens
                ],
            }
            for event in events
        ]
    }
