"""`--otlp-endpoint`: the router's spans reach an OTLP/gRPC collector (a stand-in on 127.0.0.1
implementing OTLP's TraceService) with their attributes and parent/child links."""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from shardline.router import tracing
from shardline.router.queue import Entry
from tests.test_router_fakes import FakeShardClient, fixed_script, router_client

SERVICE = "shardline-test-router"
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


@dataclass
class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Records every span exported to it, with its resource's service.name."""

    spans: list[tuple[str, trace_pb2.Span]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(self, request, context):  # noqa: N802 (the gRPC method's name)
        with self.lock:
            for resource_spans in request.resource_spans:
                service = _attributes(resource_spans.resource.attributes)["service.name"]
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    stand_in = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(stand_in, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tracing.configure(f"http://127.0.0.1:{port}", SERVICE)
    yield stand_in
    tracing.shutdown()
    server.stop(grace=None)


async def _router(tokenizer, **settings):
    fake = FakeShardClient(
        fixed_script(tokenizer),
        tokenizer.eos_token_id,
        support_chunking=settings.pop("chunking", False),
    )
    return await router_client(fake, tokenizer, max_total_tokens=128, **settings)


def _exported(collector: Collector) -> dict[str, list[trace_pb2.Span]]:
    """Flushes the exporter (tracing ends) and groups the spans by name."""
    tracing.shutdown()
    assert {service for service, _ in collector.spans} == {SERVICE}
    by_name: dict[str, list[trace_pb2.Span]] = {}
    for _, span in collector.spans:
        by_name.setdefault(span.name, []).append(span)
    return by_name


def _attributes(attributes) -> dict:
    def value(any_value):
        kind = any_value.WhichOneof("value")
        if kind == "array_value":
            return [value(item) for item in any_value.array_value.values]
        return getattr(any_value, kind)

    return {attribute.key: value(attribute.value) for attribute in attributes}


def _children(spans: dict[str, list[trace_pb2.Span]], parent: trace_pb2.Span) -> set[str]:
    return {
        name
        for name, group in spans.items()
        for span in group
        if span.parent_span_id == parent.span_id and span.trace_id == parent.trace_id
    }


async def test_a_request_is_one_span_with_validation_queue_prefill_and_decode(
    collector, tokenizer
) -> None:
    client, ctx = await _router(tokenizer)
    try:
        body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 5}}
        answer = await client.post("/generate", json=body)
        assert answer.status == 200
    finally:
        await client.close()
        await ctx.batcher.stop()
    spans = _exported(collector)
    (root,) = spans["POST /generate"]
    assert root.kind == trace_pb2.Span.SPAN_KIND_SERVER and not root.parent_span_id
    attributes = _attributes(root.attributes)
    input_tokens = len(tokenizer("Hello there").input_ids)
    assert attributes["http.route"] == "/generate"
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.usage.input_tokens"] == input_tokens
    assert attributes["gen_ai.usage.output_tokens"] == 5
    assert attributes["gen_ai.response.finish_reasons"] == ["length"]
    (request_id,) = attributes["request_ids"]
    assert _children(spans, root) == {"validation", "queue", "prefill", "decode"}
    (queue,), (prefill,), (decode,) = spans["queue"], spans["prefill"], spans["decode"]
    assert queue.end_time_unix_nano <= prefill.start_time_unix_nano
    assert prefill.end_time_unix_nano <= decode.start_time_unix_nano
    assert decode.end_time_unix_nano <= root.end_time_unix_nano
    assert _attributes(prefill.attributes) == {
        "request_id": request_id,
        "batch_size": 1,
        "prompt_tokens": input_tokens,
    }
    assert _attributes(decode.attributes) == {
        "request_id": request_id,
        "decode_steps": 4,
        "output_tokens": 5,
    }


async def test_a_traceparent_header_continues_the_callers_trace(collector, tokenizer) -> None:
    client, ctx = await _router(tokenizer)
    try:
        headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        assert (await client.post("/generate", json=body, headers=headers)).status == 200
    finally:
        await client.close()
        await ctx.batcher.stop()
    (root,) = _exported(collector)["POST /generate"]
    assert root.trace_id.hex() == CALLER_TRACE
    assert root.parent_span_id.hex() == CALLER_SPAN


async def test_a_chunked_prompt_has_one_prefill_span_per_chunk(collector, tokenizer) -> None:
    client, ctx = await _router(tokenizer, chunking=True, max_batch_prefill_tokens=4)
    prompt = "one two three four five six seven"
    try:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 3}}
        answer = await client.post("/generate_stream", json=body)
        assert answer.status == 200 and (await answer.read()).count(b"data:") == 3
    finally:
        await client.close()
        await ctx.batcher.stop()
    spans = _exported(collector)
    (root,) = spans["POST /generate_stream"]
    chunks = [_attributes(span.attributes)["prompt_tokens"] for span in spans["prefill"]]
    assert sum(chunks) == len(tokenizer(prompt).input_ids) and max(chunks) <= 4
    assert len(chunks) > 1
    assert all(span.parent_span_id == root.span_id for span in spans["prefill"])
    assert _attributes(spans["decode"][0].attributes)["decode_steps"] == 2


async def test_a_refused_request_records_its_status_and_the_failed_validation(
    collector, tokenizer
) -> None:
    client, ctx = await _router(tokenizer)
    try:
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "temperature": -1}}
        assert (await client.post("/generate", json=body)).status == 422
        assert (await client.get("/health")).status == 200
    finally:
        await client.close()
        await ctx.batcher.stop()
    spans = _exported(collector)
    (root,) = spans["POST /generate"]
    assert _attributes(root.attributes)["http.response.status_code"] == 422
    (validation,) = spans["validation"]
    assert validation.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert "queue" not in spans and not any(name.endswith("/health") for name in spans)


async def test_without_an_endpoint_nothing_is_traced(tokenizer) -> None:
    tracing.configure(None)
    assert tracing.middlewares() == []
    client, ctx = await _router(tokenizer)
    submitted: list[Entry] = []
    append = ctx.batcher._queue.append
    ctx.batcher._queue.append = lambda entry: (submitted.append(entry), append(entry))[1]
    try:
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        assert (await client.post("/generate", json=body)).status == 200
    finally:
        await client.close()
        await ctx.batcher.stop()
    assert len(submitted) == 1 and submitted[0].trace is None
