"""Hostile bodies and malformed HTTP against the router over a real shard (tiny llama): each
answers its 4xx in TGI's error JSON within seconds while victim streams run beside it, and
every victim still streams all its tokens."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.router_fixtures import open_router
from tests.victims import victim_streams

ANSWER_WITHIN_S = 5.0
JSON = {"Content-Type": "application/json"}
HUGE_INTEGER = b"1" * 5000


def _nested(depth: int) -> bytes:
    return b'{"inputs": "a", "parameters": ' + b"[" * depth + b"]" * depth + b"}"


def _body(parameters: dict) -> bytes:
    return json.dumps({"inputs": "a prompt", "parameters": parameters}).encode()


# name, route, body, status, error_type
HOSTILE_BODIES: list[tuple[str, str, bytes, int, str]] = [
    ("arrays nested 100,000 deep", "/generate", _nested(100_000), 400, "bad_request"),
    ("arrays nested 129 deep", "/generate", _nested(129), 400, "bad_request"),
    (
        "objects nested 500 deep in a chat message",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "a", "x": '
        + b'{"a": ' * 500
        + b"1"
        + b"}" * 500
        + b"}]}",
        400,
        "bad_request",
    ),
    (
        "an integer of 5,000 digits",
        "/generate",
        b'{"inputs": "a", "parameters": {"seed": ' + HUGE_INTEGER + b"}}",
        400,
        "bad_request",
    ),
    ("max_new_tokens of 10^30", "/generate", _body({"max_new_tokens": 10**30}), 422, "validation"),
    ("seed past 64 bits", "/generate_stream", _body({"seed": 2**64}), 422, "validation"),
    (
        "NaN temperature",
        "/generate",
        b'{"inputs": "a", "parameters": {"temperature": NaN}}',
        400,
        "bad_request",
    ),  # fmt: skip
    (
        "lone surrogate in a stop",
        "/generate",
        b'{"inputs": "a", "parameters": {"stop": ["\\ud800"]}}',
        400,
        "bad_request",
    ),  # fmt: skip
    (
        "invalid UTF-8",
        "/v1/completions",
        b'{"prompt": "\xff\xfe", "model": "tgi"}',
        400,
        "bad_request",
    ),  # fmt: skip
    (
        "a body over --payload-limit",
        "/generate",
        b'{"inputs": "' + b"a" * 2_000_001 + b'"}',
        413,
        "payload_too_large",
    ),  # fmt: skip
    ("empty inputs", "/generate", b'{"inputs": ""}', 422, "validation"),
    (
        "empty role",
        "/v1/chat/completions",
        b'{"messages": [{"role": "", "content": "a"}]}',
        422,
        "validation",
    ),  # fmt: skip
]

# name, raw HTTP request, status, error_type
MALFORMED_HTTP: list[tuple[str, bytes, int, str]] = [
    ("a request line that is no HTTP", b"GARBAGE\r\n\r\n", 400, "bad_request"),
    ("HTTP/9.9", b"POST /generate HTTP/9.9\r\n\r\n", 400, "bad_request"),
    (
        "a header line of 10,000 bytes",
        b"POST /generate HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 10_000 + b"\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "a chunk size that is not hexadecimal",
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "Content-Length and Transfer-Encoding together",
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n{}",
        400,
        "bad_request",
    ),
    (
        "a Content-Length over --payload-limit, the body never sent",
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 99999999\r\n\r\n{}",
        413,
        "payload_too_large",
    ),
    (
        "GET on a POST route",
        b"GET /generate HTTP/1.1\r\nHost: x\r\n\r\n",
        405,
        "method_not_allowed",
    ),
    ("an unknown route", b"POST /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found"),
]


@pytest.fixture
async def router(shard_socket: str, tiny_llama_dir: Path):
    async with open_router(shard_socket, tiny_llama_dir, max_total_tokens=64) as client:
        yield client


async def _raw_exchange(client: TestClient, request: bytes) -> tuple[int, dict[str, str], dict]:
    """Sends `request` as is on a fresh connection; the status line, headers and JSON body."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if line)
        body = await reader.readexactly(int(headers["Content-Length"]))
    finally:
        writer.close()
    return int(lines[0].split()[1]), headers, json.loads(body)


async def _assert_healthy(client: TestClient) -> None:
    assert (await client.get("/health")).status == 200
    answer = await client.post(
        "/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 2}}
    )
    assert answer.status == 200
    assert (await answer.json())["details"]["generated_tokens"] == 2


@pytest.mark.parametrize("case", HOSTILE_BODIES, ids=[case[0] for case in HOSTILE_BODIES])
async def test_a_hostile_body_gets_its_4xx_and_harms_no_stream(router, case):
    name, path, body, status, error_type = case
    async with victim_streams(router):
        started = time.monotonic()
        answer = await router.post(path, data=body, headers=JSON)
        error = await answer.json()
        took = time.monotonic() - started
    assert (answer.status, error.get("error_type")) == (status, error_type), (name, error)
    assert set(error) == {"error", "error_type"}, name
    assert took < ANSWER_WITHIN_S, (name, took)
    await _assert_healthy(router)


@pytest.mark.parametrize("case", MALFORMED_HTTP, ids=[case[0] for case in MALFORMED_HTTP])
async def test_malformed_http_gets_tgi_error_json_and_harms_no_stream(router, case):
    name, request, status, error_type = case
    async with victim_streams(router):
        answer = await asyncio.wait_for(_raw_exchange(router, request), ANSWER_WITHIN_S)
    code, headers, error = answer
    assert (code, error.get("error_type")) == (status, error_type), (name, error)
    assert set(error) == {"error", "error_type"}, name
    assert headers["Content-Type"].startswith("application/json"), name
    if status == 405:
        assert headers["Allow"] == "POST"
    await _assert_healthy(router)
