"""The asyncio client, over `aiohttp`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, overload

import aiohttp
from typing_extensions import Unpack

from .errors import RequestTimeoutError, error_from_body
from .protocol import (
    ClientSettings,
    EventStream,
    ModelT,
    chat_body,
    generate_body,
)
from .types import (
    ChatComplete,
    ChatCompletionChunk,
    ChatOptions,
    GenerateOptions,
    GenerateStreamOptions,
    Message,
    Response,
    StreamResponse,
)


class AsyncClient(ClientSettings):
    """Asyncio client for Shardline or any server speaking TGI's REST API.

    Each call opens its own connection, unless the client is used as `async with AsyncClient(...)
    as client:`, which pools connections until the block ends.

    ```python
    client = AsyncClient("http://localhost:8080")
    (await client.generate("Why is the sky blue?")).generated_text
    async for response in client.generate_stream("Why is the sky blue?"):
        print(response.token.text, end="")
    ```
    """

    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        self._session = self._new_session()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Response:
        """Generates a continuation of `prompt` (`POST /generate`), with details."""
        body = generate_body(prompt, GenerateOptions, options)
        return await self._post_json("/generate", body, Response)

    def generate_stream(
        self, prompt: str, **options: Unpack[GenerateStreamOptions]
    ) -> AsyncIterator[StreamResponse]:
        """Yields the continuation of `prompt` token by token (`POST /generate_stream`)."""
        body = generate_body(prompt, GenerateStreamOptions, options)
        return self._post_stream("/generate_stream", body, StreamResponse)

    @overload
    async def chat(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        stream: Literal[False] = False,
        **options: Unpack[ChatOptions],
    ) -> ChatComplete: ...

    @overload
    async def chat(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        stream: Literal[True],
        **options: Unpack[ChatOptions],
    ) -> AsyncIterator[ChatCompletionChunk]: ...

    async def chat(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        stream: bool = False,
        **options: Unpack[ChatOptions],
    ) -> ChatComplete | AsyncIterator[ChatCompletionChunk]:
        """Answers a conversation through the OpenAI route `POST /v1/chat/completions`.

        With `stream=True`, the awaited result is an async iterator of chunks.
        """
        body = chat_body(messages, stream, options)
        if stream:
            return self._post_stream("/v1/chat/completions", body, ChatCompletionChunk)
        return await self._post_json("/v1/chat/completions", body, ChatComplete)

    def _new_session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=self.timeout
        )
        return aiohttp.ClientSession(
            headers=self.headers,
            cookies=self.cookies,
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=0),
        )

    @asynccontextmanager
    async def _response(self, path: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        """The 200 answer to `body`, after 429 retries; client timeouts are mapped."""
        try:
            if self._session is not None:
                yield await self._send(self._session, path, body)
                return
            async with self._new_session() as session:
                yield await self._send(session, path, body)
        except asyncio.TimeoutError as exc:
            raise RequestTimeoutError(f"no data from {self.base_url} in time") from exc

    async def _send(
        self, session: aiohttp.ClientSession, path: str, body: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        """POSTs `body`, retrying 429s; raises the mapped error on any other non-200 answer."""
        attempt = 0
        while True:
            response = await session.post(self.base_url + path, json=body)
            if response.status == 200:
                return response
            async with response:
                error = error_from_body(response.status, await response.text())
            delay = self.retry.delay(response.status, attempt, response.headers.get("Retry-After"))
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def _post_json(self, path: str, body: dict[str, Any], model: type[ModelT]) -> ModelT:
        async with self._response(path, body) as response, response:
            return model.model_validate_json(await response.read())

    async def _post_stream(
        self, path: str, body: dict[str, Any], model: type[ModelT]
    ) -> AsyncIterator[ModelT]:
        async with self._response(path, body) as response, response:
            events = EventStream(model, response.status)
            async for chunk in response.content.iter_any():
                for event in events.feed(chunk):
                    yield event
                if events.done:
                    return
            for event in events.finish():
                yield event
