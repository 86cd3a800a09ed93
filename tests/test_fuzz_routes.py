"""The attacker's fuzz as a permanent test: over a thousand requests generated from the router's
own /openapi.json (valid and invalid bodies for every POST route, hypothesis with a fixed seed)
sent concurrently to a real router and shard on the tiny llama. None may get a 5xx or a 424 (a
request that failed in the batch), every error is TGI's error JSON, every stream ends without an
error event, and afterwards /health is 200 and a greedy request answers as it did before."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core import NotSet

from tests.router_fixtures import open_router

# Valid and invalid bodies per POST route, each: 1,164 requests. Fewer where hypothesis is slow
# to draw a body (~75 ms for a chat request against ~5 ms for /generate on a busy core).
EXAMPLES_PER_MODE = {
    "/generate": 150,
    "/generate_stream": 120,
    "/v1/completions": 120,
    "/": 70,
    "/tokenize": 60,
    "/v1/chat/completions": 30,
    "/v1/responses": 30,
    "/invocations": 20,
    "/chat_tokenize": 12,
}
MIN_REQUESTS = 1000
CONCURRENCY = 16
PROBE = {"inputs": "the fuzz is over", "parameters": {"max_new_tokens": 8, "details": True}}

Request = tuple[str, str, Any]  # method, path, JSON body (or NotSet)


def generated_requests(spec: dict[str, Any]) -> list[Request]:
    """Hypothesis draws the bodies from the spec's schemas, derandomized: the same requests on
    every run."""
    schema = schemathesis.openapi.from_dict(spec)
    requests: list[Request] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() != "POST":
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode, media_type="application/json")
            requests += _draw(strategy, EXAMPLES_PER_MODE[operation.path])
    return requests


def _draw(strategy: st.SearchStrategy, count: int) -> list[Request]:
    drawn: list[Request] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def draw(case) -> None:
        drawn.append((case.method.upper(), case.formatted_path, case.body))

    draw()
    return drawn


async def _send(client: TestClient, request: Request) -> tuple[int, str, bytes]:
    method, path, body = request
    if isinstance(body, NotSet):
        data = None
    elif isinstance(body, bytes):  # an invalid body schemathesis made up as raw bytes
        data = body
    else:
        data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    async with client.request(method, path, data=data, headers=headers) as answer:
        return answer.status, answer.content_type, await answer.read()


def _problem(request: Request, status: int, content_type: str, raw: bytes) -> str | None:
    """What is wrong with this answer, if anything."""
    if status >= 500 or status == 424:
        return f"status {status}"
    if status >= 400:
        error = json.loads(raw) if content_type == "application/json" else None
        if not isinstance(error, dict) or set(error) != {"error", "error_type"}:
            return f"status {status} without TGI's error JSON"
        return None
    if content_type == "text/event-stream":
        events = [line[5:] for line in raw.split(b"\n") if line.startswith(b"data:")]
        errors = [e for e in events if e.strip() != b"[DONE]" and "error" in json.loads(e)]
        return f"error event {errors[0]!r}" if errors else None
    json.loads(raw)
    return None


@pytest.fixture
async def router(shard_socket: str, tiny_llama_dir: Path):
    async with open_router(shard_socket, tiny_llama_dir, max_total_tokens=48) as client:
        yield client


async def test_a_thousand_generated_requests_get_no_5xx_and_only_tgi_error_json(router):
    before = await (await router.post("/generate", json=PROBE)).json()
    spec = await (await router.get("/openapi.json")).json()
    requests = generated_requests(spec)
    assert len(requests) >= MIN_REQUESTS, len(requests)
    slots = asyncio.Semaphore(CONCURRENCY)

    async def check(request: Request) -> tuple[int, str | None]:
        async with slots:
            status, content_type, raw = await _send(router, request)
        return status, _problem(request, status, content_type, raw)

    outcomes = await asyncio.gather(*(check(request) for request in requests))
    problems = [
        (request, problem)
        for request, (_, problem) in zip(requests, outcomes, strict=True)
        if problem is not None
    ]
    statuses = Counter(status for status, _ in outcomes)
    assert not problems, (len(problems), problems[:5], statuses)
    assert statuses[200] >= 100 and statuses[422] >= 100, statuses  # both kinds exercised
    assert (await router.get("/health")).status == 200
    assert await (await router.post("/generate", json=PROBE)).json() == before
