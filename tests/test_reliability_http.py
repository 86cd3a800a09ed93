"""Bad input, API keys, draining, disconnects, logs and metrics labels, and a schemathesis fuzz of
the router's own /openapi.json, all in front of the fake shard: every bad request gets TGI's error
JSON with a 4xx status and changes nothing for the others."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterator

import aiohttp
import pytest
import schemathesis
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from shardline.proto import generate_pb2 as pb
from shardline.router import http
from shardline.router.server import create_app, create_metrics_app
from tests.fake_shard import FakeShardClient, fixed_script, router_client

GOOD = {"inputs": "the city", "parameters": {"max_new_tokens": 6, "details": False}}
LONG = {"inputs": "the city", "parameters": {"max_new_tokens": 100, "ignore_eos": True}}
JSON = {"Content-Type": "application/json"}
MARKER = "zebra-quokka-4817"  # user input that must never reach logs or metrics labels


def _raw(body: object) -> bytes:
    return json.dumps(body).encode()


BAD_BODIES: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("malformed JSON", b'{"inputs": "a",', JSON, 400, "bad_request"),
    ("empty body", b"", JSON, 400, "bad_request"),
    ("invalid UTF-8", b'{"inputs": "\xff\xfe"}', JSON, 400, "bad_request"),
    ("inputs not a string", _raw({"inputs": 7}), JSON, 422, "validation"),
    ("missing inputs", _raw({"parameters": {}}), JSON, 422, "validation"),
    ("empty prompt", _raw({"inputs": ""}), JSON, 422, "validation"),
    # Not JSON to serde_json either (TGI's parser): 400, as TGI answers.
    ("lone surrogate", b'{"inputs": "\\ud800 a"}', JSON, 400, "bad_request"),
    ("NaN", b'{"inputs": "a", "parameters": {"temperature": NaN}}', JSON, 400, "bad_request"),
    ("Infinity", b'{"inputs": "a", "parameters": {"top_p": Infinity}}', JSON, 400, "bad_request"),
    ("1e999", b'{"inputs": "a", "parameters": {"temperature": 1e999}}', JSON, 400, "bad_request"),
    ("huge top_k", _raw({"inputs": "a", "parameters": {"top_k": 2**40}}), JSON, 422, "validation"),
    (
        "stop token id past uint32",
        _raw({"inputs": "a", "parameters": {"stop_token_ids": [2**33]}}),
        JSON,
        422,
        "validation",
    ),
    ("huge seed", _raw({"inputs": "a", "parameters": {"seed": 2**70}}), JSON, 422, "validation"),
    (
        "thousands of stop sequences",
        _raw({"inputs": "a", "parameters": {"stop": [f"s{i}" for i in range(5000)]}}),
        JSON,
        422,
        "validation",
    ),
    (
        "prompt over --max-input-tokens",
        _raw({"inputs": "the " * 300, "parameters": {"max_new_tokens": 1}}),
        JSON,
        422,
        "validation",
    ),
    (
        "body over the payload limit",
        _raw({"inputs": "a" * 2_000_001}),
        JSON,
        413,
        "payload_too_large",
    ),
    ("text/plain", _raw(GOOD), {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (
        "form",
        b"inputs=a",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
    ),
]


async def _good_answer(router) -> dict:
    answer = await router.post("/generate", json=GOOD)
    assert answer.status == 200
    return await answer.json()


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/", "/tokenize"])
async def test_bad_bodies_get_tgi_error_json_and_change_nothing(router, fake, path):
    before = await _good_answer(router)
    prefills = len(fake.calls_of("prefill"))
    for name, body, headers, status, error_type in BAD_BODIES:
        if path == "/tokenize" and status == 422 and b"parameters" in body:
            continue  # /tokenize reads only `inputs`
        answer = await router.post(path, data=body, headers=headers)
        error = await answer.json()
        assert answer.status == status, (name, error)
        assert set(error) == {"error", "error_type"} and error["error_type"] == error_type, name
    assert len(fake.calls_of("prefill")) == prefills
    assert await _good_answer(router) == before
    assert fake.num_sequences == 0


async def test_control_characters_and_unknown_fields_are_served(router):
    before = await _good_answer(router)
    body = {**GOOD, "inputs": "\x00\x01\x1b[31m\u202e the city", "unknown": {"x": 1}}
    answer = await router.post("/generate", json=body)
    assert answer.status == 200
    assert (await answer.json())["generated_text"]
    assert await _good_answer(router) == before


async def test_unknown_routes_and_methods_get_error_json(router):
    for method, path, status in [("GET", "/nope", 404), ("GET", "/generate", 405)]:
        answer = await router.request(method, path)
        assert answer.status == status
        assert set(await answer.json()) == {"error", "error_type"}


async def test_api_key_guards_every_route_but_the_probes(tokenizer, fake, monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = http.hmac.compare_digest

    def spy(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr(http.hmac, "compare_digest", spy)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128, api_key="s3cret")
    try:
        assert (await client.get("/health")).status == 200
        for header in (None, "Bearer wrong", "s3cret", "Bearer s3cre", "Bearer s3cret2"):
            headers = {"Authorization": header} if header else {}
            for method, path in [
                ("GET", "/info"),
                ("GET", "/openapi.json"),
                ("GET", "/metrics"),
                ("POST", "/generate"),
            ]:
                answer = await client.request(method, path, json=GOOD, headers=headers)
                assert answer.status == 401, (path, header)
                assert (await answer.json())["error_type"] == "unauthorized"
        ok = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/generate", json=GOOD, headers=ok)).status == 200
        assert (await client.post("/tokenize", json=GOOD, headers=ok)).status == 200
        assert (await client.get("/metrics", headers=ok)).status == 200
        assert (b"Bearer s3cret", b"Bearer s3cret") in compared
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_metrics_without_auth_opens_metrics_alone(tokenizer, fake):
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128, api_key="s3cret")
    ctx.metrics_without_auth = True
    open_app = TestClient(TestServer(create_app(ctx)))
    metrics_port = TestClient(TestServer(create_metrics_app(ctx)))
    await open_app.start_server()
    await metrics_port.start_server()
    try:
        for server in (open_app, metrics_port):
            answer = await server.get("/metrics")
            assert answer.status == 200
            assert "tgi_request_count" in await answer.text()
        assert (await open_app.get("/info")).status == 401
        assert (await metrics_port.get("/info")).status == 404
    finally:
        for server in (open_app, metrics_port, client):
            await server.close()
        await ctx.batcher.stop()


@contextlib.asynccontextmanager
async def _one_request_running(tokenizer, step_delay: float, body: dict):
    """The router over a fake shard taking `step_delay` a step, once `body` is generating."""
    fake = FakeShardClient(fixed_script(tokenizer), tokenizer.eos_token_id, step_delay=step_delay)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128)
    try:
        running = asyncio.create_task(client.post("/generate", json=body))
        while ctx.in_flight == 0:
            await asyncio.sleep(0.01)
        yield client, ctx, running
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_draining_refuses_new_requests_with_503_and_finishes_in_flight(tokenizer):
    async with _one_request_running(tokenizer, 0.05, GOOD) as (client, ctx, running):
        drained = asyncio.create_task(ctx.drain(timeout_s=30))
        await asyncio.sleep(0.05)
        for method, path in [
            ("POST", "/generate"),
            ("POST", "/generate_stream"),
            ("GET", "/health"),
        ]:
            answer = await client.request(method, path, json=GOOD)
            assert answer.status == 503, path
            assert (await answer.json())["error_type"] == "shutting_down"
        assert (await running).status == 200
        assert await drained is True


async def test_drain_gives_up_at_its_timeout(tokenizer):
    async with _one_request_running(tokenizer, 0.2, {"inputs": "a"}) as (_, ctx, running):
        assert await ctx.drain(timeout_s=0.1) is False
        running.cancel()


async def _send_marked_traffic(client) -> None:
    """Requests that carry MARKER everywhere a user can put it: good, bad, failed, cut short."""
    marked = {"inputs": f"the {MARKER}", "parameters": {"max_new_tokens": 3, "stop": [MARKER]}}
    assert (await client.post("/generate", json=marked)).status == 200
    assert (await client.post("/generate_stream", json=marked)).status == 200
    bad = {"inputs": MARKER, "parameters": {MARKER: 1, "temperature": MARKER}}
    assert (await client.post("/generate", json=bad)).status == 422
    assert (await client.post("/generate", data=f"{{{MARKER}".encode(), headers=JSON)).status == 400
    assert (await client.get(f"/{MARKER}", headers={"X-Marker": MARKER})).status == 404
    answer = await client.post("/generate_stream", json={"inputs": MARKER})
    answer.close()


OPENAI_LONG = {"prompt": "the city", "max_tokens": 100, "ignore_eos": True}


async def _disconnect_mid_stream(url: str, path: str, body: dict) -> None:
    """Starts a long stream on a connection of its own and drops the connection once the first
    event came."""
    async with aiohttp.ClientSession() as session:
        answer = await session.post(url + path, json=body)
        await answer.content.readline()
        answer.close()


async def test_every_disconnect_during_generation_counts_once(tokenizer):
    fake = FakeShardClient(fixed_script(tokenizer), tokenizer.eos_token_id, step_delay=0.02)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128)
    url = str(client.make_url("")).rstrip("/")
    try:
        openai_stream = {**OPENAI_LONG, "stream": True}
        streams = [_disconnect_mid_stream(url, "/generate_stream", LONG) for _ in range(5)]
        streams += [_disconnect_mid_stream(url, "/v1/completions", openai_stream) for _ in range(5)]
        collected = [asyncio.create_task(client.post("/generate", json=LONG)) for _ in range(5)]
        collected += [
            asyncio.create_task(client.post("/v1/completions", json=OPENAI_LONG)) for _ in range(5)
        ]
        await asyncio.gather(*streams)
        while ctx.batcher.running_size < 10:  # the collected ones are generating
            await asyncio.sleep(0.01)
        for task in collected:
            task.cancel()
        await asyncio.gather(*collected, return_exceptions=True)
        while ctx.in_flight:
            await asyncio.sleep(0.01)
        assert ctx.metrics.request_failure.value(err="disconnected") == 20
        assert ctx.metrics.request_count.value() == 20
        assert ctx.metrics.request_success.value() == 0
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_metrics_labels_carry_no_user_input(router):
    await _send_marked_traffic(router)
    text = (await (await router.get("/metrics")).read()).decode()
    assert MARKER not in text
    assert 'tgi_request_failure{err="validation"}' in text


async def test_prompts_and_bodies_are_never_logged_at_info(tokenizer, caplog):
    fake = FakeShardClient(fixed_script(tokenizer), tokenizer.eos_token_id, step_delay=0.01)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128)
    caplog.set_level(logging.DEBUG)
    try:
        await _send_marked_traffic(client)
        fake.fail_on = "decode"
        answer = await client.post("/generate", json={"inputs": MARKER})
        assert answer.status == 424
    finally:
        await client.close()
        await ctx.batcher.stop()
    # The access log (request lines, no bodies) is the test server's; shardline-router has none.
    logged = [r for r in caplog.records if r.levelno >= logging.INFO and r.name != "aiohttp.access"]
    assert logged, "nothing was logged: the check would be vacuous"
    for record in logged:
        assert MARKER not in record.getMessage() and MARKER not in repr(vars(record)), record


async def test_kv_block_gauges_come_from_the_shard_stats(router, fake, monkeypatch):
    async def stats() -> pb.StatsResponse:
        return pb.StatsResponse(total_blocks=96, free_blocks=90)

    monkeypatch.setattr(fake, "stats", stats)
    text = (await (await router.get("/metrics")).read()).decode()
    assert "shardline_kv_blocks_free 90.0" in text
    assert "shardline_kv_blocks_total 96.0" in text


# ---- schemathesis ------------------------------------------------------------------------------


@pytest.fixture
def router_url(tokenizer) -> Iterator[str]:
    """The router on a loop of its own thread, so schemathesis can call it synchronously."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake = FakeShardClient(fixed_script(tokenizer), tokenizer.eos_token_id)
    started = asyncio.run_coroutine_threadsafe(
        router_client(fake, tokenizer, max_total_tokens=128), loop
    )
    client, ctx = started.result(timeout=30)
    yield str(client.make_url("")).rstrip("/")

    async def stop() -> None:
        await client.close()
        await ctx.batcher.stop()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def fuzz(url: str, examples_per_operation: int) -> dict[int, int]:
    """Valid and invalid requests for every operation of the server's own spec; no 5xx."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(
                max_examples=examples_per_operation,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case) -> None:
                response = case.call(base_url=url, timeout=60)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, (case.path, case.body, response.text)
                if response.status_code >= 400:
                    assert set(response.json()) == {"error", "error_type"}

            call()
    return statuses


def test_schemathesis_fuzz_finds_no_server_error(router_url):
    import requests

    statuses = fuzz(router_url, examples_per_operation=25)
    assert statuses.get(200) and statuses.get(422), statuses
    answer = requests.post(f"{router_url}/generate", json=GOOD, timeout=30)
    assert answer.status_code == 200
