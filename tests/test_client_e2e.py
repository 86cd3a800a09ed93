"""The Python client (clients/python) against the real server: `text-generation-launcher` on the
tiny llama, one CPU shard. Every method of `Client` and `AsyncClient`, errors the real router
answers mapped to their exception classes, 429 retries, and 16 concurrent async streams.

Two servers run for the module: one with the default limits, and one with
`--max-concurrent-requests 1` for the overload tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import unused_port
from shardline_client import (
    AsyncClient,
    Client,
    OverloadedError,
    RequestTimeoutError,
    ValidationError,
)
from shardline_client.types import Response, StreamResponse
from transformers import AutoTokenizer

from tests.launcher_harness import LIMITS, Launcher, transformers_greedy

pytestmark = pytest.mark.slow

PROMPT = "the model server shard"
MESSAGES = [{"role": "user", "content": "the city river"}]
NEW_TOKENS = 12
LONG = {"max_new_tokens": 480, "ignore_eos": True}
CLIENTS = ["sync", "async"]


@pytest.fixture(scope="module")
def servers(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`main` and `single` (one request at a time): their base URLs, both started together."""
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path_factory.mktemp("client-e2e")),
        "CUDA_VISIBLE_DEVICES": "",
    }
    extra = {"main": [], "single": ["--max-concurrent-requests", "1"]}
    launchers = {name: Launcher(_argv(tiny_llama_dir, flags), env) for name, flags in extra.items()}
    try:
        yield {name: _ready_url(launcher) for name, launcher in launchers.items()}
    finally:
        for launcher in launchers.values():
            launcher.kill()


def _argv(model_dir: Path, extra: list[str]) -> list[str]:
    argv = ["--model-id", str(model_dir), "--num-shard", "1", "--json-output"]
    argv += ["--hostname", "127.0.0.1", "--port", str(unused_port())]
    return [*argv, "--master-port", str(unused_port()), *LIMITS, *extra]


def _ready_url(launcher: Launcher) -> str:
    ready = launcher.wait_for_line("Shardline is ready", timeout_s=180)
    return json.loads(ready)["message"].split(" on ")[1]


@pytest.fixture(scope="module")
def url(servers: dict[str, str]) -> str:
    return servers["main"]


async def call(kind: str, client: Client | AsyncClient, method: str, *args: Any, **kw: Any) -> Any:
    """`client.method(...)`, the sync client's in a thread; a stream is returned as a list."""
    if kind == "sync":
        return await asyncio.to_thread(_call_sync, getattr(client, method), args, kw)
    result = getattr(client, method)(*args, **kw)
    if isinstance(result, Awaitable):
        result = await result
    if hasattr(result, "__aiter__"):
        return [item async for item in result]
    return result


def _call_sync(function: Callable[..., Any], args: tuple, kw: dict) -> Any:
    result = function(*args, **kw)
    return list(result) if isinstance(result, Iterator) else result


def make_client(kind: str, url: str, **settings: Any) -> Client | AsyncClient:
    settings.setdefault("timeout", 60)
    return Client(url, **settings) if kind == "sync" else AsyncClient(url, **settings)


def token_ids(response: Response) -> list[int]:
    assert response.details is not None
    return [token.id for token in response.details.tokens]


# ---- every method --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expected(tiny_llama_dir: Path) -> list[int]:
    return transformers_greedy(tiny_llama_dir, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_generate_with_details_equals_transformers(url, expected, kind) -> None:
    client = make_client(kind, url)
    response = await call(
        kind, client, "generate", PROMPT, max_new_tokens=NEW_TOKENS, decoder_input_details=True
    )
    assert token_ids(response) == expected
    details = response.details
    assert details.finish_reason == "length" and details.generated_tokens == NEW_TOKENS
    assert [token.text for token in details.prefill] and details.seed is None
    assert all(token.logprob is not None and token.logprob <= 0 for token in details.tokens)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_generate_stream_yields_generates_tokens_in_order(url, kind) -> None:
    client = make_client(kind, url)
    whole: Response = await call(kind, client, "generate", PROMPT, max_new_tokens=NEW_TOKENS)
    events: list[StreamResponse] = await call(
        kind, client, "generate_stream", PROMPT, max_new_tokens=NEW_TOKENS
    )
    assert [event.token.id for event in events] == token_ids(whole)
    assert [event.index for event in events] == list(range(1, NEW_TOKENS + 1))
    assert all(event.generated_text is None for event in events[:-1])
    assert events[-1].generated_text == whole.generated_text
    assert events[-1].details.finish_reason == "length"


@pytest.mark.parametrize("kind", CLIENTS)
async def test_chat_and_its_stream_answer_the_templated_prompt(url, tiny_llama_dir, kind) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    client = make_client(kind, url)
    whole: Response = await call(kind, client, "generate", prompt, max_new_tokens=NEW_TOKENS)
    options = {"max_tokens": NEW_TOKENS, "temperature": 0}
    answer = await call(kind, client, "chat", MESSAGES, **options)
    chunks = await call(kind, client, "chat", MESSAGES, stream=True, **options)
    assert answer.choices[0].message.content == whole.generated_text
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == NEW_TOKENS
    assert "".join(chunk.choices[0].delta.content for chunk in chunks) == whole.generated_text
    assert [chunk.choices[0].finish_reason for chunk in chunks][-2:] == [None, "length"]


# ---- errors from the real server ----------------------------------------------------------------


def _failures(url: str, error_type: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    found = re.search(rf'^tgi_request_failure\{{err="{error_type}"\}} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("method", ["generate", "generate_stream", "chat"])
async def test_a_request_past_the_token_limit_is_a_validation_error(url, kind, method) -> None:
    client = make_client(kind, url)
    if method == "chat":
        first, options = MESSAGES, {"max_tokens": 600}
    else:
        first, options = PROMPT, {"max_new_tokens": 600}
    with pytest.raises(ValidationError) as raised:
        await call(kind, client, method, first, **options)
    assert (raised.value.status_code, raised.value.error_type) == (422, "validation")
    assert "512" in raised.value.message


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_stalled_answer_is_a_request_timeout(url, kind) -> None:
    client = make_client(kind, url, timeout=0.2)
    with pytest.raises(RequestTimeoutError):
        await call(kind, client, "generate", PROMPT, **LONG)


class Occupied:
    """A long stream holding the `single` server's only request slot until `release()`."""

    def __init__(self, url: str) -> None:
        self._client = AsyncClient(url, timeout=60)
        self._stream = self._client.generate_stream(PROMPT, **LONG)

    async def __aenter__(self) -> Occupied:
        await anext(self._stream)
        return self

    async def release(self) -> None:
        await self._stream.aclose()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()


@pytest.mark.parametrize("kind", CLIENTS)
async def test_overloaded_without_retry_raises_at_once(servers, kind) -> None:
    url = servers["single"]
    client = make_client(kind, url, max_retries=0)
    async with Occupied(url):
        refused_before = _failures(url, "overloaded")
        with pytest.raises(OverloadedError) as raised:
            await call(kind, client, "generate", PROMPT, max_new_tokens=4)
        assert _failures(url, "overloaded") == refused_before + 1
    assert (raised.value.status_code, raised.value.error_type) == (429, "overloaded")


@pytest.mark.parametrize("kind", CLIENTS)
async def test_overloaded_with_retry_succeeds_once_the_slot_frees(servers, kind) -> None:
    url = servers["single"]
    client = make_client(kind, url, max_retries=30, backoff_factor=0.05, max_backoff=0.2)
    async with Occupied(url) as occupied:
        refused_before = _failures(url, "overloaded")
        retried = asyncio.create_task(call(kind, client, "generate", PROMPT, max_new_tokens=4))
        while _failures(url, "overloaded") < refused_before + 2:
            assert not retried.done()
            await asyncio.sleep(0.02)
        await occupied.release()
        response = await asyncio.wait_for(retried, 30)
    assert response.details.generated_tokens == 4


# ---- concurrency --------------------------------------------------------------------------------


async def _timed_stream(
    client: AsyncClient, prompt: str, max_new_tokens: int
) -> tuple[list[StreamResponse], float, float]:
    """The stream's events and when its first and its last arrived."""
    events, arrivals = [], []
    async for event in client.generate_stream(prompt, max_new_tokens=max_new_tokens):
        events.append(event)
        arrivals.append(time.monotonic())
    return events, arrivals[0], arrivals[-1]


async def test_sixteen_concurrent_async_streams_each_equal_their_single_request(url) -> None:
    # Long enough that all sixteen have joined before the shortest ends, even when a loaded
    # machine spreads their arrivals (the 16th joins a later step through TGI's join rule).
    requests = [
        (f"{PROMPT} {word} {i}", 64 + 2 * i) for i, word in enumerate(["river", "cache"] * 8)
    ]
    async with AsyncClient(url, timeout=60) as client:
        singles = [await client.generate(prompt, max_new_tokens=n) for prompt, n in requests]
        streams = await asyncio.gather(*(_timed_stream(client, *request) for request in requests))
    for single, (events, _, _) in zip(singles, streams, strict=True):
        assert [event.token.id for event in events] == token_ids(single)
        assert events[-1].generated_text == single.generated_text
    assert max(first for _, first, _ in streams) < min(last for _, _, last in streams)
