"""The Python client (clients/python) against the mock TGI server (tests/mock_tgi.py): errors
mapped to exception classes, retries and timeouts, and the load generator."""

from __future__ import annotations

import itertools
import json
import time
import typing
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import shardline_client
from shardline_client import errors
from shardline_client.loadgen import LoadRequest, run_load
from shardline_client.loadgen import main as loadgen_main
from shardline_client.protocol import RetryPolicy

from tests import mock_tgi
from tests.mock_tgi import MockTGI, _async_client, _client, _texts

mock = mock_tgi.mock
no_spec_violations = mock_tgi.no_spec_violations

# ---------------------------------------------------------------- errors

ERROR_CASES = [
    ("error:validation:422", errors.ValidationError),
    ("error:generation:424", errors.GenerationError),
    ("error:overloaded:429", errors.OverloadedError),
    ("error:incomplete_generation:500", errors.IncompleteGenerationError),
    ("error:template_error:422", errors.ValidationError),
    ("error:bad_request:400", errors.BadRequestError),
    ("error:unauthorized:401", errors.AuthenticationError),
    ("error::400", errors.BadRequestError),
    ("error::401", errors.AuthenticationError),
    ("error::404", errors.NotFoundError),
    ("error::429", errors.RateLimitExceededError),
    ("error::503", errors.ShardNotReadyError),
    ("error:mystery:500", errors.UnknownError),
    ("raw:502", errors.UnknownError),
]


def _sync_calls(client: shardline_client.Client, prompt: str) -> list[typing.Callable]:
    messages = [{"role": "user", "content": prompt}]
    return [
        lambda: client.generate(prompt),
        lambda: list(client.generate_stream(prompt)),
        lambda: client.chat(messages),
        lambda: list(client.chat(messages, stream=True)),
    ]


async def _async_calls(client: shardline_client.AsyncClient, prompt: str) -> list[typing.Callable]:
    messages = [{"role": "user", "content": prompt}]
    return [
        lambda: client.generate(prompt),
        lambda: _drain(client.generate_stream(prompt)),
        lambda: client.chat(messages),
        lambda: _drain_awaited(client.chat(messages, stream=True)),
    ]


async def _drain(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


async def _drain_awaited(awaitable: typing.Awaitable[AsyncIterator[Any]]) -> list[Any]:
    return await _drain(await awaitable)


def _assert_error(exc: errors.ShardlineError, prompt: str) -> None:
    if prompt.startswith("error:"):
        _, error_type, status = prompt.split(":")
        assert exc.status_code == int(status)
        assert exc.error_type == (error_type or "")
        assert exc.message.startswith("mock")
    else:
        assert exc.status_code == 502 and "Bad Gateway" in exc.message


@pytest.mark.parametrize(("prompt", "expected"), ERROR_CASES)
def test_sync_errors_map_to_classes(mock: MockTGI, prompt: str, expected: type) -> None:
    for call in _sync_calls(_client(mock, max_retries=0), prompt):
        with pytest.raises(expected) as caught:
            call()
        _assert_error(caught.value, prompt)


@pytest.mark.parametrize(("prompt", "expected"), ERROR_CASES)
async def test_async_errors_map_to_classes(mock: MockTGI, prompt: str, expected: type) -> None:
    for call in await _async_calls(_async_client(mock, max_retries=0), prompt):
        with pytest.raises(expected) as caught:
            await call()
        _assert_error(caught.value, prompt)


def test_stream_error_events(mock: MockTGI) -> None:
    client = _client(mock)
    received = []
    with pytest.raises(errors.GenerationError, match="mock generation error"):
        for response in client.generate_stream("midstream", max_new_tokens=5):
            received.append(response.token.text)
    assert received == _texts("midstream", 2)
    with pytest.raises(errors.ValidationError):
        list(client.generate_stream("event-error:validation"))


async def test_async_stream_error_event(mock: MockTGI) -> None:
    with pytest.raises(errors.GenerationError):
        await _drain(_async_client(mock).generate_stream("midstream", max_new_tokens=5))


# ---------------------------------------------------------------- retry and timeouts


def test_retry_on_429_then_success(mock: MockTGI) -> None:
    prompt = f"429x2:{uuid.uuid4()}"
    response = _client(mock).generate(prompt, max_new_tokens=1)
    assert response.generated_text == f"{prompt}:0 "
    assert mock.attempts[prompt] == 3


def test_retry_gives_up_after_max_retries(mock: MockTGI) -> None:
    prompt = f"429x5:{uuid.uuid4()}"
    with pytest.raises(errors.OverloadedError) as caught:
        list(_client(mock, max_retries=2).generate_stream(prompt))
    assert caught.value.status_code == 429
    assert mock.attempts[prompt] == 3


async def test_async_retry_on_429_then_success(mock: MockTGI) -> None:
    prompt = f"429x2:{uuid.uuid4()}"
    client = _async_client(mock)
    texts = [response.token.text async for response in client.generate_stream(prompt)]
    assert len(texts) == 20 and mock.attempts[prompt] == 3
    prompt = f"429x1:{uuid.uuid4()}"
    reply = await client.chat([{"role": "user", "content": prompt}])
    assert reply.choices[0].finish_reason == "length"


def test_retry_policy_backs_off_exponentially() -> None:
    policy = RetryPolicy(max_retries=4, backoff_factor=1.0, max_backoff=5.0)
    for attempt, ceiling in enumerate([1.0, 2.0, 4.0, 5.0]):
        delay = policy.delay(429, attempt, None)
        assert min(ceiling / 2, 2.5) <= delay <= ceiling
    assert policy.delay(429, 4, None) is None
    assert policy.delay(503, 0, None) is None
    assert policy.delay(429, 0, "3") == 3.0
    assert policy.delay(429, 0, "60") == 5.0
    assert policy.delay(429, 0, "Wed, 21 Oct 2015 07:28:00 GMT") <= 1.0


def test_sync_timeouts(mock: MockTGI) -> None:
    client = _client(mock, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(errors.RequestTimeoutError):
        client.generate("sleep")
    with pytest.raises(TimeoutError):
        list(client.generate_stream("stall", max_new_tokens=3))
    assert time.monotonic() - start < 1.5


async def test_async_timeouts(mock: MockTGI) -> None:
    client = _async_client(mock, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(errors.RequestTimeoutError):
        await client.generate("sleep")
    with pytest.raises(TimeoutError):
        await _drain(client.generate_stream("stall", max_new_tokens=3))
    assert time.monotonic() - start < 1.5


# ---------------------------------------------------------------- load generator


async def test_run_load_reports_every_stream(mock: MockTGI) -> None:
    async with _async_client(mock) as client:
        report = await run_load(
            client, [f"l{i}" for i in range(8)] + ["error:validation:422"], 4, max_new_tokens=5
        )
    summary = report.summary()
    assert summary["requests"] == 8 and summary["errors"] == 1
    assert summary["output_tokens"] == 40 and mock.peak["l"] == 4
    assert 0 < summary["ttft_p50_ms"] <= summary["latency_p99_ms"]
    assert summary["tpot_p50_ms"] > 0 and summary["itl_p99_ms"] > 0


async def test_run_load_takes_options_per_request(mock: MockTGI) -> None:
    requests = [
        LoadRequest("a", {"max_new_tokens": 2}),
        "b",
        LoadRequest("c", {"max_new_tokens": 7}),
    ]
    async with _async_client(mock) as client:
        report = await run_load(client, requests, 1, max_new_tokens=5)
    assert [len(timing.token_times) for timing in report.timings] == [2, 5, 7]
    for timing in report.timings:
        assert 0 < timing.ttft == timing.token_times[0]
        assert timing.token_times == sorted(timing.token_times)
    # one at a time: each sent (seconds into the run) once the one before it ended
    for before, after in itertools.pairwise(report.timings):
        assert after.sent_at >= before.sent_at + before.latency


async def test_run_load_all_at_once_sends_each_request_as_it_is_made() -> None:
    log: list[str] = []

    class LoggingClient:
        async def generate_stream(self, prompt: str, **options: Any) -> AsyncIterator[str]:
            log.append(f"sent {prompt}")
            yield "token"

    def made(count: int) -> Iterator[str]:
        for i in range(count):
            log.append(f"made {i}")
            yield str(i)

    report = await run_load(LoggingClient(), made(50), 50)  # type: ignore[arg-type]
    assert len(report.timings) == 50 and not report.errors
    # not every request made first and then all sent (1,000 connections opened before any
    # request went out held a burst's first request back ~0.5 s)
    assert log.index("sent 0") < log.index("made 49")


def test_loadgen_cli(mock: MockTGI, capsys: pytest.CaptureFixture[str]) -> None:
    loadgen_main(["--url", mock.url, "--num-requests", "3", "--max-new-tokens", "2", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"] == 3 and summary["output_tokens"] == 6
