"""How the OpenAI-style routes (/v1/chat/completions, /v1/completions, /v1/responses) serve a
parsed request: a slot per prompt, `Validator.validate` per prompt, one batcher stream per
prompt (its n samples are that stream's sequences), then an answer or a stream of events.

What the body looks like is the route's `Presenter`: the serving here is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from shardline.router import tracing
from shardline.router.batcher import RequestStream
from shardline.router.errors import RouterError
from shardline.router.http import SSE_HEADERS, RouterContext, context, counting_failure
from shardline.router.request_types import StreamEvent, ValidRequest
from shardline.router.tools import NoToolChosen, ToolCalling
from shardline.sampling_params import SamplingParams


@dataclass(frozen=True)
class OpenAIJob:
    """A parsed OpenAI request: `n` generations per prompt, all with the same parameters."""

    chat: bool
    prompts: list[str]
    params: SamplingParams
    stream: bool
    include_usage: bool = False
    top_logprobs: int | None = None
    """None: no logprobs; else how many alternatives each token gets."""
    echo: bool = False
    """Completions: the prompt comes back before the completion (with its logprobs if asked)."""
    tools: ToolCalling | None = None
    without_tools: OpenAIJob | None = None
    """With tools: the same request without them, answered when the model picks `no_tool`."""
    request_fields: Mapping[str, Any] = field(default_factory=dict)
    """What the answer repeats of the request (the Responses API's `instructions`, ...)."""

    def choice_index(self, prompt_index: int, event: StreamEvent) -> int:
        """Choices are numbered prompt by prompt, the n samples of each in order (as OpenAI)."""
        return prompt_index * self.params.n + event.sequence_index

    @property
    def prompt_details(self) -> bool:
        """Whether the shards must return the prompt's logprobs (echo with logprobs)."""
        return self.echo and self.top_logprobs is not None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those found in the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Presenter(Protocol):
    """The route's bodies: the whole answer, or the stream's events (SSE bytes)."""

    def answer(self, results: list[list[StreamEvent]], usage: Usage) -> dict[str, Any]: ...

    def opening(self) -> list[bytes]:
        """Sent before the first token's events (asked for once that token came)."""
        ...

    def events(self, prompt_index: int, event: StreamEvent) -> list[bytes]:
        """What one token sends; [] while holding it back (a tool call's name unknown yet)."""
        ...

    def closing(self, finals: list[StreamEvent], usage: Usage) -> list[bytes]:
        """After the last token; `finals`: each sequence's last event."""
        ...

    def failure(self, error: RouterError) -> bytes:
        """An error after the first byte was sent."""
        ...


JobParser = Callable[[RouterContext, Any], OpenAIJob]
PresenterFactory = Callable[[RouterContext, OpenAIJob, list[ValidRequest]], Presenter]


async def serve(
    request: web.Request, parse: JobParser, present: PresenterFactory, body: Any
) -> web.StreamResponse:
    """Counts the request as TGI's routes do, holds a slot per prompt, answers or streams."""
    ctx = context(request)
    ctx.metrics.request_count.inc()
    started = time.monotonic()
    with counting_failure(ctx):
        job = parse(ctx, body)
        with contextlib.ExitStack() as slots:
            for _ in job.prompts:
                slots.enter_context(ctx.request_slot())
            try:
                response, succeeded = await _respond(request, ctx, job, present)
            except NoToolChosen:  # TGI answers again, without tools
                assert job.without_tools is not None
                response, succeeded = await _respond(request, ctx, job.without_tools, present)
    if succeeded:
        ctx.metrics.request_success.inc()
        ctx.metrics.request_duration.observe(time.monotonic() - started)
    return response


async def _respond(
    request: web.Request, ctx: RouterContext, job: OpenAIJob, present: PresenterFactory
) -> tuple[web.StreamResponse, bool]:
    requests = await _validate(ctx, job)
    presenter = present(ctx, job, requests)
    if job.stream:
        return await _stream(request, ctx, requests, presenter)
    return await _answer(ctx, requests, presenter), True


@tracing.traced("validation")
async def _validate(ctx: RouterContext, job: OpenAIJob) -> list[ValidRequest]:
    started = time.monotonic()
    requests = [
        await ctx.validator.validate(
            prompt,
            job.params,
            top_n_tokens=job.top_logprobs or 0,
            decoder_input_details=job.prompt_details,
            add_special_tokens=not job.chat,  # the chat template wrote the special tokens
        )
        for prompt in job.prompts
    ]
    ctx.metrics.request_validation_duration.observe(time.monotonic() - started)
    for valid in requests:
        ctx.metrics.request_input_length.observe(valid.input_length)
        ctx.metrics.request_max_new_tokens.observe(valid.max_new_tokens)
    return requests


def _usage(requests: list[ValidRequest], events: list[StreamEvent]) -> Usage:
    """The prompt counts once per prompt, whatever its n; every sample's tokens count."""
    finished = [event.finished for event in events if event.finished]
    generated = sum(done.generated_tokens for done in finished)
    # Each prompt's first sequence (or beam) tells what its prompt found cached.
    cached = sum(event.finished.cached_tokens for event in events if _first_of_prompt(event))
    return Usage(sum(valid.input_length for valid in requests), generated, cached)


def _first_of_prompt(event: StreamEvent) -> bool:
    return event.finished is not None and event.sequence_index == 0


async def _answer(
    ctx: RouterContext, requests: list[ValidRequest], presenter: Presenter
) -> web.Response:
    streams = [ctx.batcher.submit(valid) for valid in requests]
    tasks = [asyncio.ensure_future(stream.collect()) for stream in streams]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        _cancel(streams, tasks)
    usage = _usage(requests, [event for events in results for event in events])
    return web.json_response(presenter.answer(results, usage))


async def _stream(
    request: web.Request, ctx: RouterContext, requests: list[ValidRequest], presenter: Presenter
) -> tuple[web.StreamResponse, bool]:
    """An error before the first token is an HTTP error, after it an event.

    Returns the response and whether the request succeeded.
    """
    streams = [ctx.batcher.submit(valid) for valid in requests]
    events = _merge(streams)
    response = web.StreamResponse(headers=SSE_HEADERS)
    finals: list[StreamEvent] = []
    try:
        item = await anext(events)
        opening = presenter.opening()
        sent = presenter.events(*item)
        while not sent and item[1].finished is None:  # a tool call's name, text to send
            item = await anext(events)
            sent = presenter.events(*item)
        await response.prepare(request)
        sent = opening + sent
        while item is not None:
            for payload in sent:
                await response.write(payload)
            if item[1].finished is not None:
                finals.append(item[1])
            try:
                item = await anext(events, None)
                sent = [] if item is None else presenter.events(*item)
            except RouterError as error:
                ctx.metrics.request_failure.inc(err=error.error_type)
                await response.write(presenter.failure(error))
                return response, False
        for payload in presenter.closing(finals, _usage(requests, finals)):
            await response.write(payload)
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
                try:
                    event = task.result()
                except StopAsyncIteration:  # a stream of several sequences ended
                    continue
                yield index, event
                pending[asyncio.ensure_future(anext(streams[index]))] = index
    finally:
        for task in pending:
            task.cancel()


def _cancel(streams: list[RequestStream], tasks: list[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for stream in streams:
        stream.cancel()
