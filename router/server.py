"""TGI's REST routes over aiohttp: /generate, /generate_stream, /, /invocations, /info, /health
(and its alias /ping), /v2/health/live, /metrics, /tokenize, /openapi.json and /docs (Swagger UI).
Every error is `{"error", "error_type"}` with TGI's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from shardline.router import tracing
from shardline.router.cors import enable_cors
from shardline.router.errors import (
    RouterError,
    ShuttingDownError,
    UnhealthyError,
    ValidationError,
)
from shardline.router.http import (
    CONTEXT,
    SSE_HEADERS,
    RouterContext,
    auth_middleware,
    context,
    counting_failure,
    error_middleware,
    read_json,
    sse_event,
)
from shardline.router.openai_routes import OPENAI_ROUTES, sagemaker_invocations
from shardline.router.openapi import openapi_spec
from shardline.router.request_types import (
    StreamEvent,
    Token,
    ValidRequest,
    by_sequence,
    mean_logprob,
)
from shardline.router.responses_route import RESPONSES_ROUTES
from shardline.router.schemas.common import parse
from shardline.router.schemas.tgi import CompatGenerateRequest, GenerateRequest, TokenizeRequest
from shardline.router.swagger_ui import swagger_ui
from shardline.router.tgi_params import ResponseOptions, validate_generate

logger = logging.getLogger(__name__)

STATS_TIMEOUT_S = 2.0
# Kubernetes' readiness probe times out after 1 s by default: /health answers within 2 s even
# when a shard does not answer its Health.
HEALTH_PROBE_TIMEOUT_S = 1.5
# Served without the API key: probes and the docs page; /metrics too with --metrics-without-auth.
OPEN_PATHS = frozenset({"/health", "/ping", "/v2/health/live", "/docs"})


def create_app(ctx: RouterContext, cors_allow_origins: Sequence[str] = ()) -> web.Application:
    open_paths = OPEN_PATHS | {"/metrics"} if ctx.metrics_without_auth else OPEN_PATHS
    app = web.Application(
        client_max_size=ctx.payload_limit,
        middlewares=[
            *tracing.middlewares(),
            error_middleware,
            auth_middleware(ctx.api_key, open_paths),
        ],
    )
    enable_cors(app, cors_allow_origins)
    app[CONTEXT] = ctx
    app.add_routes(
        [
            web.post("/generate", generate),
            web.post("/generate_stream", generate_stream),
            web.post("/", compat_generate),
            web.post("/invocations", sagemaker_invocations(compat_generate)),
            web.get("/info", info),
            web.get("/health", health),
            web.get("/ping", health),
            web.get("/v2/health/live", live),
            web.get("/metrics", metrics),
            web.post("/tokenize", tokenize),
            web.get("/openapi.json", openapi),
            web.get("/docs", swagger_ui),
            *OPENAI_ROUTES,
            *RESPONSES_ROUTES,
        ]
    )
    return app


def create_metrics_app(ctx: RouterContext) -> web.Application:
    """/metrics alone, without the API key: what `--prometheus-port` serves."""
    app = web.Application(middlewares=[error_middleware])
    app[CONTEXT] = ctx
    app.add_routes([web.get("/metrics", metrics)])
    return app


# ---- generation --------------------------------------------------------------------------------


async def generate(request: web.Request) -> web.Response:
    return await _generate(request, await read_json(request), as_list=False)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    return await _generate_stream(request, await read_json(request))


async def compat_generate(request: web.Request) -> web.StreamResponse:
    body = parse(CompatGenerateRequest, await read_json(request))
    if body.stream:
        return await _generate_stream(request, body)
    return await _generate(request, body, as_list=True)


@tracing.traced("validation")
async def _validate(
    ctx: RouterContext, body: Any, stream: bool
) -> tuple[ValidRequest, ResponseOptions]:
    """`body`: the request's JSON, or `/`'s already parsed."""
    started = time.monotonic()
    generate = body if isinstance(body, GenerateRequest) else parse(GenerateRequest, body)
    valid, options = await validate_generate(ctx.validator, generate, stream)
    ctx.metrics.request_validation_duration.observe(time.monotonic() - started)
    ctx.metrics.request_input_length.observe(valid.input_length)
    ctx.metrics.request_max_new_tokens.observe(valid.max_new_tokens)
    return valid, options


async def _generate(request: web.Request, body: Any, as_list: bool) -> web.Response:
    ctx = context(request)
    started = _count_request(ctx)
    with counting_failure(ctx), ctx.request_slot():
        valid, options = await _validate(ctx, body, stream=False)
        stream = ctx.batcher.submit(valid)
        try:
            events = await stream.collect()
        finally:
            stream.cancel()
    _count_success(ctx, started)
    answer = generate_response(valid, options, events)
    return web.json_response([answer] if as_list else answer)


async def _generate_stream(request: web.Request, body: Any) -> web.StreamResponse:
    ctx = context(request)
    started = _count_request(ctx)
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        with counting_failure(ctx), ctx.request_slot():
            valid, options = await _validate(ctx, body, stream=True)
            stream = ctx.batcher.submit(valid)
            try:
                first = await anext(stream)
                await response.prepare(request)
                await _write_events(ctx, response, first, stream, valid, options)
            finally:
                stream.cancel()
    except ConnectionError:
        logger.info("client disconnected mid-stream")
        return response
    _count_success(ctx, started)
    return response


async def _write_events(
    ctx: RouterContext,
    response: web.StreamResponse,
    event: StreamEvent,
    stream: Any,
    valid: ValidRequest,
    options: ResponseOptions,
) -> None:
    """Writes one SSE event per token; an error after the first byte is one error event."""
    while True:
        await response.write(sse_event(stream_response(valid, options, event)))
        if event.finished is not None:
            return
        try:
            event = await anext(stream)
        except RouterError as error:
            ctx.metrics.request_failure.inc(err=error.error_type)
            await response.write(sse_event(error.to_json()))
            return


def _count_request(ctx: RouterContext) -> float:
    ctx.metrics.request_count.inc()
    return time.monotonic()


def _count_success(ctx: RouterContext, started: float) -> None:
    ctx.metrics.request_success.inc()
    ctx.metrics.request_duration.observe(time.monotonic() - started)


# ---- response bodies ---------------------------------------------------------------------------


def token_json(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def prefill_token_json(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob}


def _full_text(valid: ValidRequest, options: ResponseOptions, text: str) -> str:
    return valid.inputs + text if options.return_full_text else text


def generate_response(
    valid: ValidRequest, options: ResponseOptions, events: list[StreamEvent]
) -> dict[str, Any]:
    """TGI's answer. With best_of, the sample of highest mean token logprob is the answer and
    the others (in order) are its best_of_sequences, as TGI does; with beam search, the best
    beam is the answer and the other beams, best first, are its best_of_sequences."""
    sequences = by_sequence(events)
    best = 0 if valid.params.use_beam_search else _highest_mean_logprob(sequences)
    prefill = next((event.prefill for event in events if event.prefill), [])
    answer = _sequence_json(valid, options, sequences[best], prefill)
    if not options.details:  # TGI leaves `details` out unless asked
        return {"generated_text": answer["generated_text"]}
    details = {k: v for k, v in answer.items() if k != "generated_text"}
    if len(sequences) > 1:  # TGI leaves `best_of_sequences` out when there are none
        details["best_of_sequences"] = [
            _sequence_json(valid, options, sequence, prefill)
            for index, sequence in enumerate(sequences)
            if index != best
        ]
    return {"generated_text": answer["generated_text"], "details": details}


def _highest_mean_logprob(sequences: list[list[StreamEvent]]) -> int:
    """TGI's rule: the first sequence of strictly highest mean logprob per generated token."""
    means = [mean_logprob(sequence) for sequence in sequences]
    return means.index(max(means))


def _sequence_json(
    valid: ValidRequest,
    options: ResponseOptions,
    events: list[StreamEvent],
    prefill: list[Token],
) -> dict[str, Any]:
    finished = events[-1].finished
    if finished is None:
        raise RuntimeError("a finished request has no final event")
    return {
        "generated_text": _full_text(valid, options, finished.generated_text),
        "finish_reason": finished.reason.value,
        "generated_tokens": finished.generated_tokens,
        "seed": finished.seed,
        "prefill": [prefill_token_json(t) for t in prefill],
        "tokens": [token_json(event.token) for event in events],
        "top_tokens": [[token_json(t) for t in event.top_tokens] for event in events]
        if valid.top_n_tokens
        else [],
    }


def stream_response(
    valid: ValidRequest, options: ResponseOptions, event: StreamEvent
) -> dict[str, Any]:
    finished = event.finished
    details = None
    if finished is not None and options.details:
        details = {
            "finish_reason": finished.reason.value,
            "generated_tokens": finished.generated_tokens,
            "seed": finished.seed,
            "input_length": finished.input_length,
        }
    return {
        "index": event.index,
        "token": token_json(event.token),
        "top_tokens": [token_json(t) for t in event.top_tokens],
        "generated_text": None
        if finished is None
        else _full_text(valid, options, finished.generated_text),
        "details": details,
    }


# ---- the other routes --------------------------------------------------------------------------


async def info(request: web.Request) -> web.Response:
    return web.json_response(context(request).info)


async def health(request: web.Request) -> web.Response:
    """503 while draining, once a shard step has run past `unready_step_s` (a fraction of its
    deadline: readiness takes the pod out before the router gives up on the shard), once a
    shard call ran past its deadline, or when a shard misses its Health within
    `HEALTH_PROBE_TIMEOUT_S`.

    Health is answered by each shard's event loop, not behind its engine thread, so asking it
    costs nothing while a batch runs, and it catches a stopped shard between steps too.
    """
    ctx = context(request)
    if ctx.draining:
        raise ShuttingDownError("the server is shutting down")
    if ctx.batcher.stuck is not None:
        raise UnhealthyError(f"unhealthy: {ctx.batcher.stuck}")
    step_s = ctx.batcher.oldest_step_s
    if ctx.unready_step_s is not None and step_s > ctx.unready_step_s:
        raise UnhealthyError(f"unhealthy: a shard step has run for {step_s:.1f} s")
    try:
        await asyncio.wait_for(ctx.client.health(), HEALTH_PROBE_TIMEOUT_S)
    except Exception as error:
        logger.warning("health check failed: %s", str(error) or type(error).__name__)
        raise UnhealthyError("unhealthy: a shard did not answer its health check") from error
    return web.Response(status=200)


async def live(request: web.Request) -> web.Response:
    """Liveness (KServe's route, as TGI serves it): answers while the router's event loop runs,
    asks no shard, so a long step or a drain never fails it. Readiness stays on /health."""
    return web.json_response({"live": True})


async def metrics(request: web.Request) -> web.Response:
    ctx = context(request)
    await _refresh_kv_blocks(ctx)
    body = ctx.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def _refresh_kv_blocks(ctx: RouterContext) -> None:
    try:
        stats = await asyncio.wait_for(ctx.client.stats(), STATS_TIMEOUT_S)
    except Exception as error:
        logger.warning("shard stats unavailable: %s", error)
        return
    ctx.metrics.kv_blocks_free.set(stats.free_blocks)
    ctx.metrics.kv_blocks_total.set(stats.total_blocks)
    ctx.metrics.kv_blocks_cached.set(stats.cached_blocks)


async def tokenize(request: web.Request) -> web.Response:
    inputs = parse(TokenizeRequest, await read_json(request)).inputs
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    encoding = await context(request).validator.encode(inputs)
    return web.json_response(
        [
            {"id": token_id, "text": inputs[start:stop], "start": start, "stop": stop}
            for token_id, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True)
        ]
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec())
