"""OpenTelemetry traces of the router's requests (`--otlp-endpoint`), exported over OTLP/gRPC
as TGI's router exports them; a W3C `traceparent` header continues the caller's trace.

Each HTTP request is one span (route, request ids, input and output token counts, finish
reasons). Its children: `validation`, then per generation request it submitted (a chat with
`n` prompts submits several): `queue` (until it joins a batch), one `prefill` per Prefill call
it took part in (one per chunk of a chunked prompt), and `decode`, from its first token to its
last, with the number of decode steps. One span per decode step of every request would cost
the router's per-token path; the `decode` span sums them up instead.

Without an endpoint nothing here runs: no middleware is installed and requests carry no trace.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from aiohttp import web

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from shardline.router.queue import Entry

DEFAULT_SERVICE_NAME = "text-generation-inference.router"
UNTRACED_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapes, every few seconds

_P = ParamSpec("_P")
_R = TypeVar("_R")


class _Exporter:
    """The tracer and its provider while tracing is on."""

    tracer: Tracer | None = None
    provider: TracerProvider | None = None


_exporter = _Exporter()
_current: ContextVar[RequestTrace | None] = ContextVar("shardline_request_trace", default=None)


def configure(endpoint: str | None, service_name: str = DEFAULT_SERVICE_NAME) -> None:
    """Exports the spans to the OTLP/gRPC collector at `endpoint` (`http://host:4317`; https
    for TLS); None leaves tracing off."""
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _exporter.provider = provider
    _exporter.tracer = provider.get_tracer("shardline.router")


def shutdown() -> None:
    """Sends the spans still buffered and turns tracing off."""
    provider, _exporter.provider, _exporter.tracer = _exporter.provider, None, None
    if provider is not None:
        provider.shutdown()


def middlewares() -> list[Any]:
    """The request-span middleware when tracing is on, none otherwise."""
    return [] if _exporter.tracer is None else [_request_span]


@web.middleware
async def _request_span(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    tracer = _exporter.tracer
    if tracer is None or request.path in UNTRACED_PATHS:
        return await handler(request)
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    attributes = {"http.request.method": request.method, "url.path": request.path}
    if route is not None:
        attributes["http.route"] = route
    with tracer.start_as_current_span(
        f"{request.method} {route}" if route else request.method,
        context=TraceContextTextMapPropagator().extract(request.headers),
        kind=SpanKind.SERVER,
        attributes=attributes,
    ) as span:
        trace = RequestTrace(tracer, span)
        token = _current.set(trace)
        try:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            return response
        finally:
            _current.reset(token)
            trace.close()


def traced(name: str) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Awaitable[_R]]]:
    """Runs the coroutine function in a child span `name` of the request's span, if traced."""

    def wrap(function: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
        @functools.wraps(function)
        async def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            tracer = _exporter.tracer
            if tracer is None or _current.get() is None:
                return await function(*args, **kwargs)
            with tracer.start_as_current_span(name):
                return await function(*args, **kwargs)

        return run

    return wrap


def entry_trace(entry: Entry) -> EntryTrace | None:
    """The spans of a request the batcher just queued; None when its HTTP request is untraced."""
    trace = _current.get()
    return None if trace is None else trace.add(entry)


class RequestTrace:
    """The span of one HTTP request and the generation requests it submitted."""

    def __init__(self, tracer: Tracer, span: Span) -> None:
        from opentelemetry.trace import set_span_in_context

        self._tracer = tracer
        self.span = span
        self._context = set_span_in_context(span)
        self._entries: list[EntryTrace] = []

    def add(self, entry: Entry) -> EntryTrace:
        traced_entry = EntryTrace(self, entry)
        self._entries.append(traced_entry)
        return traced_entry

    def child(self, name: str, attributes: dict[str, Any]) -> Span:
        return self._tracer.start_span(name, context=self._context, attributes=attributes)

    def close(self) -> None:
        """Ends what its requests left open (a client gone mid-stream) and sums them up."""
        if not self._entries:
            return
        for traced_entry in self._entries:
            traced_entry.close()
        entries = [traced.entry for traced in self._entries]
        self.span.set_attributes(
            {
                "request_ids": [entry.id for entry in entries],
                "gen_ai.usage.input_tokens": sum(entry.request.input_length for entry in entries),
                "gen_ai.usage.output_tokens": sum(entry.generated_tokens for entry in entries),
                "gen_ai.response.finish_reasons": [
                    reason for traced in self._entries for reason in traced.finish_reasons
                ],
            }
        )


class EntryTrace:
    """The `queue`, `prefill` and `decode` spans of one generation request."""

    def __init__(self, request: RequestTrace, entry: Entry) -> None:
        self._request = request
        self.entry = entry
        self.finish_reasons: list[str] = []
        self._closed = False
        self._open: dict[str, Span] = {"queue": request.child("queue", {"request_id": entry.id})}

    def prefill_sent(self, batch_size: int, prompt_tokens: int) -> None:
        """Its prompt (or a chunk of it, `prompt_tokens` long) is in a Prefill of `batch_size`."""
        self._end("queue")
        self._start("prefill", batch_size=batch_size, prompt_tokens=prompt_tokens)

    def prefill_answered(self, prompt_done: bool) -> None:
        self._end("prefill")
        if prompt_done:
            self._start("decode")

    def close(self, error: BaseException | None = None) -> None:
        """Ends its open spans, with `error` as their status when it failed."""
        if self._closed:
            return
        self._closed = True
        if "decode" in self._open:
            steps = max((len(seq.generated_ids) for seq in self.entry.sequences), default=1)
            self._open["decode"].set_attributes(
                {"decode_steps": max(steps - 1, 0), "output_tokens": self.entry.generated_tokens}
            )
        for name in list(self._open):
            if error is not None:
                from opentelemetry.trace import Status, StatusCode

                self._open[name].set_status(Status(StatusCode.ERROR, str(error)))
            self._end(name)

    def _start(self, name: str, **attributes: Any) -> None:
        if not self._closed:
            self._open[name] = self._request.child(
                name, {"request_id": self.entry.id, **attributes}
            )

    def _end(self, name: str) -> None:
        span = self._open.pop(name, None)
        if span is not None:
            span.end()
