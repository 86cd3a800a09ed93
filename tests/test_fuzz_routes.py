"""The attacker's fuzz as a permanent test: thousands of requests generated from the router's
own /openapi.json (valid and invalid bodies for every POST route: hypothesis, derandomized, and
schemathesis's coverage cases, each field at its bounds and of every wrong type) sent
concurrently to a real router and shard on the tiny llama. None may get a 5xx or a 424 (a
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
from schemathesis import Case, GenerationMode
from schemathesis.config import GenerationConfig
from schemathesis.core import NotSet

from tests.router_fixtures import open_router

# Valid and invalid bodies hypothesis draws per POST route, each: fewer where a body is slow to
# draw (~75 ms for a chat request against ~5 ms for /generate on a busy core).
EXAMPLES_PER_MODE = {
    "/generate": 75,
    "/generate_stream": 60,
    "/v1/completions": 60,
    "/": 35,
    "/tokenize": 30,
    "/v1/chat/completions": 15,
    "/v1/responses": 15,
    "/invocations": 10,
}
OTHER_ROUTE_EXAMPLES = 6
MIN_REQUESTS = 3000  # ~600 drawn by hypothesis, ~3,300 coverage cases
CONCURRENCY = 16
PROBE = {"inputs": "the fuzz is over", "parameters": {"max_new_tokens": 8, "details": True}}

Request = tuple[str, str, Any]  # method, path, JSON body (or NotSet)


def generated_requests(spec: dict[str, Any]) -> list[Request]:
    """The same requests on every run: hypothesis draws derandomized, coverage cases are fixed."""
    schema = schemathesis.openapi.from_dict(spec)
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    requests: list[Request] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() != "POST":
            continue
        count = EXAMPLES_PER_MODE.get(operation.path, OTHER_ROUTE_EXAMPLES)
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode, media_type="application/json")
            requests += _draw(strategy, count)
        coverage = schema.iter_coverage_cases(
            operation, generation_modes=modes, generation_config=GenerationConfig()
        )
        requests += [_as_request(case) for case in coverage]
    return requests


def _as_request(case: Case) -> Request:
    return case.method.upper(), case.formatted_path, case.body


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
    def draw(case: Case) -> None:
        drawn.append(_as_request(case))

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
