"""An in-test server speaking TGI's wire format for the Python client's tests (clients/python):
the `mock` fixture, and the autouse `no_spec_violations`, which fails a test using `mock` when a
request or answer broke TGI's OpenAPI spec, so the mock cannot drift from the contract the real
router implements. A test module binds both fixtures by name (`mock = mock_tgi.mock`).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import shardline_client
from aiohttp import web

from tests.router_assertions import TGI_SPEC_PATH

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
