"""The Python client (clients/python) against an in-test server speaking TGI's wire format.

Every request the client sends and every answer the mock server gives is checked against TGI's
OpenAPI spec, so the mock cannot drift from the contract the real router implements.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
import time
import typing
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import shardline_client
import text_generation
import text_generation.errors
import text_generation.types
from aiohttp import web
from shardline_client import errors, types
from shardline_client.loadgen import LoadRequest, run_load
from shardline_client.loadgen import main as loadgen_main
from shardline_client.protocol import EventStream, RetryPolicy

from tests.router_assertions import TGI_SPEC_PATH

CLIENT_README = Path(__file__).resolve().parents[1] / "clients/python/README.md"
TOKEN_DELAY_S = 0.002


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schema to JSON Schema: `nullable` becomes a null alternative."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    skipped = {"nullable", "example", "default", "discriminator"}
    converted = {key: _json_schema(value) for key, value in node.items() if key not in skipped}
    return {"anyOf": [converted, {"type": "null"}]} if node.get("nullable") else converted


class SpecChecker:
    def __init__(self, spec_path: Path) -> None:
        components = _json_schema(json.loads(spec_path.read_text())["components"])
        self._components = components
        self.violations: list[str] = []

    def check(self, schema: str, payload: Any) -> None:
        document = {"$ref": f"#/components/schemas/{schema}", "components": self._components}
        try:
            jsonschema.Draft202012Validator(document).validate(payload)
        except jsonschema.ValidationError as exc:
            self.violations.append(f"{schema}: {exc.message}")
            raise


class MockTGI:
    """TGI's routes with canned generations. The prompt (or last chat message) steers it:
    `error:<type>:<status>` answers that error JSON, `raw:<status>` a non-JSON body,
    `429x<n>:<key>` answers 429 n times per key, `sleep` waits before answering, `stall`
    pauses a stream after its first token, `midstream` fails a stream after two tokens,
    `event-error:<type>` fails a stream in its first event (TGI's own way)."""

    def __init__(self, spec: SpecChecker) -> None:
        self.spec = spec
        self.url = ""
        self.seen: list[web.Request] = []
        self.bodies: list[dict[str, Any]] = []
        self.attempts: Counter[str] = Counter()
        self.active: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/generate_stream", self.generate_stream)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def _read(self, request: web.Request, schema: str) -> dict[str, Any]:
        body = await request.json()
        self.spec.check(schema, body)
        self.seen.append(request)
        self.bodies.append(body)
        return body

    def _early_answer(self, prompt: str) -> web.Response | None:
        if match := re.fullmatch(r"error:(\w*):(\d+)", prompt):
            return self._error(match[1] or None, int(match[2]))
        if match := re.fullmatch(r"raw:(\d+)", prompt):
            return web.Response(status=int(match[1]), text="<html>Bad Gateway</html>")
        if match := re.fullmatch(r"429x(\d+):.*", prompt):
            self.attempts[prompt] += 1
            if self.attempts[prompt] <= int(match[1]):
                response = self._error("overloaded", 429)
                response.headers["Retry-After"] = "0"
                return response
        return None

    def _error(self, error_type: str | None, status: int) -> web.Response:
        payload = {"error": f"mock {error_type} error", "error_type": error_type}
        if error_type is None:
            payload = {"error": "mock error without type", "error_type": ""}
        self.spec.check("ErrorResponse", payload)
        return web.json_response(payload, status=status)

    @staticmethod
    def _tokens(prompt: str, count: int) -> list[dict[str, Any]]:
        return [
            {"id": 10 + i, "text": f"{prompt}:{i} ", "logprob": -0.5, "special": False}
            for i in range(count)
        ]

    def _details(self, prompt: str, parameters: dict[str, Any]) -> dict[str, Any]:
        tokens = self._tokens(prompt, parameters["max_new_tokens"])
        prefill = [{"id": 1, "text": "<s>", "logprob": None}]
        top_n = parameters.get("top_n_tokens")
        return {
            "finish_reason": "length",
            "generated_tokens": len(tokens),
            "seed": parameters.get("seed"),
            "prefill": prefill if parameters.get("decoder_input_details") else [],
            "tokens": tokens,
            "top_tokens": [[token] * top_n for token in tokens] if top_n else [],
        }

    async def generate(self, request: web.Request) -> web.Response:
        body = await self._read(request, "GenerateRequest")
        prompt, parameters = body["inputs"], body["parameters"]
        if early := self._early_answer(prompt):
            return early
        if prompt == "sleep":
            await asyncio.sleep(1.0)
        details = self._details(prompt, parameters)
        text = "".join(token["text"] for token in details["tokens"])
        if parameters.get("best_of", 1) > 1:
            best = {**details, "generated_text": text}
            details["best_of_sequences"] = [best] * (parameters["best_of"] - 1)
        if parameters.get("return_full_text"):
            text = prompt + text
        payload = {"generated_text": text, "details": details}
        self.spec.check("GenerateResponse", payload)
        return web.json_response(payload)

    async def _sse(
        self, request: web.Request, prompt: str, events: AsyncIterator[str]
    ) -> web.StreamResponse:
        """Streams `events`; counts concurrent streams per prompt family (`p0`, `p1`: `p`)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b":\n\n")  # keep-alive comment, as servers send
        family = prompt.rstrip("0123456789")
        self.active[family] += 1
        self.peak[family] = max(self.peak[family], self.active[family])
        try:
            async for event in events:
                await response.write(event.encode())
                await asyncio.sleep(TOKEN_DELAY_S)
        finally:
            self.active[family] -= 1
        return response

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request, "GenerateRequest")
        prompt = body["inputs"]
        if early := self._early_answer(prompt):
            return early
        return await self._sse(request, prompt, self._token_events(prompt, body["parameters"]))

    async def _token_events(self, prompt: str, parameters: dict[str, Any]) -> AsyncIterator[str]:
        if match := re.fullmatch(r"event-error:(\w+)", prompt):
            yield self._error_event(match[1])
            return
        tokens = self._tokens(prompt, parameters["max_new_tokens"])
        for index, token in enumerate(tokens, start=1):
            if prompt == "midstream" and index == 3:
                yield self._error_event("generation")
                return
            if prompt == "stall" and index == 2:
                await asyncio.sleep(1.0)
            event = {"index": index, "token": token, "top_tokens": [], "generated_text": None}
            if index == len(tokens):
                event["generated_text"] = "".join(token["text"] for token in tokens)
                event["details"] = {
                    "finish_reason": "length",
                    "generated_tokens": len(tokens),
                    "input_length": 3,
                    "seed": None,
                }
            self.spec.check("StreamResponse", event)
            yield f"data:{json.dumps(event)}\n\n"

    def _error_event(self, error_type: str) -> str:
        payload = {"error": f"mock {error_type} error", "error_type": error_type}
        self.spec.check("ErrorResponse", payload)
        return f"data:{json.dumps(payload)}\n\n"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request, "ChatRequest")
        prompt = body["messages"][-1]["content"]
        if early := self._early_answer(prompt):
            return early
        tokens = self._tokens(prompt, body.get("max_tokens", 4))
        if body.get("stream"):
            return await self._sse(request, prompt, self._chunk_events(tokens))
        usage = {"prompt_tokens": 3, "completion_tokens": len(tokens), "total_tokens": 3}
        usage["total_tokens"] += len(tokens)
        message = {"role": "assistant", "content": "".join(token["text"] for token in tokens)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}
        payload = {**self._chat_head("chat.completion"), "choices": [choice], "usage": usage}
        self.spec.check("ChatCompletion", payload)
        return web.json_response(payload)

    @staticmethod
    def _chat_head(kind: str) -> dict[str, Any]:
        return {
            "id": "",
            "object": kind,
            "created": 1_700_000_000,
            "model": "mock/model",
            "system_fingerprint": "mock",
        }

    async def _chunk_events(self, tokens: list[dict[str, Any]]) -> AsyncIterator[str]:
        for index, token in enumerate(tokens, start=1):
            choice = {
                "index": 0,
                "delta": {"role": "assistant", "content": token["text"]},
                "logprobs": None,
                "finish_reason": "length" if index == len(tokens) else None,
            }
            chunk = {**self._chat_head("chat.completion.chunk"), "choices": [choice]}
            self.spec.check("ChatCompletionChunk", chunk)
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
        yield "data: not json: a client must stop at [DONE]\n\n"


@pytest.fixture(scope="module")
def mock() -> Iterator[MockTGI]:
    mock = MockTGI(SpecChecker(TGI_SPEC_PATH))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(mock.app(), handler_cancellation=True)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    host, port = runner.addresses[0][:2]
    mock.url = f"http://{host}:{port}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield mock
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.run_until_complete(runner.cleanup())
    loop.close()


@pytest.fixture(autouse=True)
def no_spec_violations(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "mock" in request.fixturenames:
        mock = request.getfixturevalue("mock")
        assert not mock.spec.violations
        mock.spec.violations.clear()


def _client(mock: MockTGI, **settings: Any) -> shardline_client.Client:
    return shardline_client.Client(mock.url, backoff_factor=0.01, **settings)


def _async_client(mock: MockTGI, **settings: Any) -> shardline_client.AsyncClient:
    return shardline_client.AsyncClient(mock.url, backoff_factor=0.01, **settings)


def _texts(prompt: str, count: int) -> list[str]:
    return [f"{prompt}:{i} " for i in range(count)]


# ---------------------------------------------------------------- generate


def test_generate_sends_every_parameter_and_parses_details(mock: MockTGI) -> None:
    grammar = types.Grammar(type=types.GrammarType.Json, value={"type": "object"})
    vllm_extras = {
        "presence_penalty": 0.2,
        "min_p": 0.05,
        "min_tokens": 2,
        "ignore_eos": True,
        "skip_special_tokens": False,
        "stop_token_ids": [2, 3],
    }
    response = _client(mock).generate(
        "hello",
        do_sample=True,
        max_new_tokens=3,
        best_of=2,
        repetition_penalty=1.1,
        frequency_penalty=0.3,
        return_full_text=True,
        stop_sequences=["###"],
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        truncate=100,
        typical_p=0.95,
        watermark=True,
        decoder_input_details=True,
        top_n_tokens=2,
        grammar=grammar,
        **vllm_extras,
    )
    sent = mock.bodies[-1]["parameters"]
    assert sent["stop"] == ["###"] and sent["details"] is True
    assert sent["grammar"] == {"type": "json", "value": {"type": "object"}}
    assert {key: sent[key] for key in vllm_extras} == vllm_extras
    assert response.generated_text == "hello" + "".join(_texts("hello", 3))
    details = response.details
    assert details.finish_reason is types.FinishReason.Length
    assert [token.text for token in details.tokens] == _texts("hello", 3)
    assert details.prefill == [types.PrefillToken(id=1, text="<s>", logprob=None)]
    assert len(details.top_tokens) == 3 and len(details.top_tokens[0]) == 2
    assert isinstance(details.best_of_sequences[0], types.BestOfSequence)


def test_generate_omits_unset_options(mock: MockTGI) -> None:
    _client(mock).generate("plain")
    assert mock.bodies[-1]["parameters"] == {
        "do_sample": False,
        "max_new_tokens": 20,
        "return_full_text": False,
        "watermark": False,
        "stop": [],
        "details": True,
    }


def test_bad_options_raise_before_sending(mock: MockTGI) -> None:
    client = _client(mock)
    sent = len(mock.bodies)
    with pytest.raises(errors.ValidationError, match="temperature"):
        client.generate("x", temperature="hot")
    with pytest.raises(errors.ValidationError, match="best_of"):
        list(client.generate_stream("x", best_of=2))
    with pytest.raises(errors.ValidationError, match="messages"):
        client.chat([{"content": "no role"}])
    assert len(mock.bodies) == sent


def test_headers_cookies_and_api_key_are_sent(mock: MockTGI) -> None:
    client = _client(mock, headers={"X-Trace": "t1"}, cookies={"session": "c1"}, api_key="k3y")
    client.generate("auth")
    request = mock.seen[-1]
    assert request.headers["Authorization"] == "Bearer k3y"
    assert request.headers["X-Trace"] == "t1"
    assert request.cookies["session"] == "c1"


async def test_async_generate(mock: MockTGI) -> None:
    response = await _async_client(mock, api_key="k").generate("async", max_new_tokens=2)
    assert response.generated_text == "".join(_texts("async", 2))
    assert mock.seen[-1].headers["Authorization"] == "Bearer k"


# ---------------------------------------------------------------- streams


def test_generate_stream_yields_tokens_in_order(mock: MockTGI) -> None:
    responses = list(_client(mock).generate_stream("s", max_new_tokens=5, min_p=0.1))
    assert mock.bodies[-1]["parameters"]["min_p"] == 0.1
    assert [response.index for response in responses] == [1, 2, 3, 4, 5]
    assert [response.token.text for response in responses] == _texts("s", 5)
    assert all(response.details is None for response in responses[:-1])
    last = responses[-1]
    assert last.generated_text == "".join(_texts("s", 5))
    assert last.details == types.StreamDetails(
        finish_reason="length", generated_tokens=5, input_length=3
    )


async def test_async_generate_stream_yields_tokens_in_order(mock: MockTGI) -> None:
    stream = _async_client(mock).generate_stream("a", max_new_tokens=4)
    texts = [response.token.text async for response in stream]
    assert texts == _texts("a", 4)


async def test_async_client_16_concurrent_streams(mock: MockTGI) -> None:
    prompts = [f"p{i}" for i in range(16)]

    async def stream(client: shardline_client.AsyncClient, prompt: str) -> list[str]:
        return [r.token.text async for r in client.generate_stream(prompt, max_new_tokens=8)]

    async with _async_client(mock) as client:
        results = await asyncio.gather(*(stream(client, prompt) for prompt in prompts))
    assert results == [_texts(prompt, 8) for prompt in prompts]
    assert mock.peak["p"] == 16


def test_chat(mock: MockTGI) -> None:
    messages = [
        types.Message(role="system", content="Be brief."),
        {"role": "user", "content": "hi"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    reply = _client(mock).chat(messages, max_tokens=3, temperature=0.5, tools=tools, min_p=0.1)
    sent = mock.bodies[-1]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["tools"][0]["function"] == {"name": "f", "arguments": {}}
    assert sent["min_p"] == 0.1 and sent["stream"] is False
    assert isinstance(reply, types.ChatCompletion)
    assert reply.choices[0].message.content == "".join(_texts("hi", 3))
    assert reply.usage.completion_tokens == 3


def test_chat_stream_stops_at_done(mock: MockTGI) -> None:
    chunks = list(_client(mock).chat([{"role": "user", "content": "c"}], stream=True, max_tokens=4))
    assert [chunk.choices[0].delta.content for chunk in chunks] == _texts("c", 4)
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None, None, None, "length"]


async def test_async_chat(mock: MockTGI) -> None:
    client = _async_client(mock)
    messages = [{"role": "user", "content": "ac"}]
    reply = await client.chat(messages, max_tokens=2)
    assert reply.choices[0].message.content == "".join(_texts("ac", 2))
    chunks = await client.chat(messages, stream=True, max_tokens=3)
    assert [chunk.choices[0].delta.content async for chunk in chunks] == _texts("ac", 3)


def test_event_stream_handles_any_chunking() -> None:
    events = [{"index": 1, "token": {"id": 1, "text": "é🙂", "logprob": None, "special": False}}]
    body = ": keep-alive\r\n\r\n" + "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events)
    stream = EventStream(types.StreamResponse, 200)
    raw = body.encode()
    parsed = [event for i in range(len(raw)) for event in stream.feed(raw[i : i + 1])]
    assert [event.token.text for event in parsed] == ["é🙂"]
    unterminated = EventStream(types.StreamResponse, 200)
    assert list(unterminated.feed(b"data:" + json.dumps(events[0]).encode())) == []
    assert len(list(unterminated.finish())) == 1


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


def test_loadgen_cli(mock: MockTGI, capsys: pytest.CaptureFixture[str]) -> None:
    loadgen_main(["--url", mock.url, "--num-requests", "3", "--max-new-tokens", "2", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"] == 3 and summary["output_tokens"] == 6


# ---------------------------------------------------------------- text_generation compatibility


def _accepted_arguments(function: typing.Callable) -> set[str]:
    hints = typing.get_type_hints(function, include_extras=True)
    (options_type,) = typing.get_args(hints["options"])
    return set(inspect.signature(function).parameters) | set(options_type.__annotations__)


@pytest.mark.parametrize("method", ["generate", "generate_stream", "chat"])
@pytest.mark.parametrize("client_class", ["Client", "AsyncClient"])
def test_accepts_every_text_generation_argument(client_class: str, method: str) -> None:
    theirs = getattr(getattr(text_generation, client_class), method)
    ours = getattr(getattr(shardline_client, client_class), method)
    assert set(inspect.signature(theirs).parameters) <= _accepted_arguments(ours)


def test_exports_text_generation_names() -> None:
    error_names = {
        name
        for name, value in vars(text_generation.errors).items()
        if isinstance(value, type) and issubclass(value, Exception)
    } - {"NotSupportedError"}
    request_only = {"Parameters", "Request", "ChatRequest", "DeployedModel"}
    type_names = {
        name
        for name, value in vars(text_generation.types).items()
        if isinstance(value, type) and value.__module__ == "text_generation.types"
    } - request_only
    assert error_names <= set(vars(errors))
    assert type_names <= set(vars(types))


def test_readme_example_runs(mock: MockTGI) -> None:
    code = re.search(r"```python\n(.*?)```", CLIENT_README.read_text(), re.S)[1]
    exec(code.replace("http://localhost:8080", mock.url), {})
