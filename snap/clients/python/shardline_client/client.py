"""The blocking client, over `requests`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any, Literal, overload

import requests
from typing_extensions import Unpack
from urllib3.exceptions import ReadTimeoutError

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


class Client(ClientSettings):
    """Blocking client for Shardline or any server speaking TGI's REST API.

    ```python
    client = Client("http://localhost:8080")
    client.generate("Why is the sky blue?", max_new_tokens=32).generated_text
    for response in client.generate_stream("Why is the sky blue?"):
        print(response.token.text, end="")
    ```
    """

    @cached_property
    def _session(self) -> requests.Session:
        session = requests.Session()
        session.headers.update(self.headers)
        session.cookies.update(self.cookies)
        return session

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes pooled connections; the client stays usable."""
        session = self.__dict__.pop("_session", None)
        if session is not None:
            session.close()

    def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Response:
        """Generates a continuation of `prompt` (`POST /generate`), with details."""
        body = generate_body(prompt, GenerateOptions, options)
        return self._post_json("/generate", body, Response)

    def generate_stream(
        self, prompt: str, **options: Unpack[GenerateStreamOptions]
    ) -> Iterator[StreamResponse]:
        """Yields the continuation of `prompt` token by token (`POST /generate_stream`)."""
        body = generate_body(prompt, GenerateStreamOptions, options)
        return self._post_stream("/generate_stream", body, StreamResponse)

    @overload
    def chat(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        stream: Literal[False] = False,
        **options: Unpack[ChatOptions],
    ) -> ChatComplete: ...

    @overload
    def chat(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        stream: Literal[True],
        **options: Unpack[ChatOptions],
    ) -> Iterator[ChatCompletionChunk]: ...

    def chat(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        stream: bool = False,
        **options: Unpack[ChatOptions],
    ) -> ChatComplete | Iterator[ChatCompletionChunk]:
        """Answers a conversation through the OpenAI route `POST /v1/chat/completions`."""
        body = chat_body(messages, stream, options)
        if stream:
            return self._post_stream("/v1/chat/completions", body, ChatCompletionChunk)
        return self._post_json("/v1/chat/completions", body, ChatComplete)

    def _post_json(self, path: str, body: dict[str, Any], model: type[ModelT]) -> ModelT:
        with self._send(path, body, stream=False) as response:
            return model.model_validate_json(response.content)

    def _post_stream(
        self, path: str, body: dict[str, Any], model: type[ModelT]
    ) -> Iterator[ModelT]:
        with self._send(path, body, stream=True) as response:
            events = EventStream(model, response.status_code)
            for chunk in _chunks(response):
                yield from events.feed(chunk)
                if events.done:
                    return
            yield from events.finish()

    def _send(self, path: str, body: dict[str, Any], stream: bool) -> requests.Response:
        """POSTs `body`, retrying 429s; raises the mapped error on any other non-200 answer."""
        attempt = 0
        while True:
            response = self._post_once(path, body, stream)
            if response.status_code == 200:
                return response
            with response:
                error = error_from_body(response.status_code, response.text)
            delay = self.retry.delay(
                response.status_code, attempt, response.headers.get("Retry-After")
            )
            if delay is None:
                raise error
            time.sleep(delay)
            attempt += 1

    def _post_once(self, path: str, body: dict[str, Any], stream: bool) -> requests.Response:
        try:
            return self._session.post(
                self.base_url + path, json=body, stream=stream, timeout=self.timeout
            )
        except requests.Timeout as exc:
            raise RequestTimeoutError(f"no answer from {self.base_url} in time: {exc}") from exc


def _chunks(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives; a stalled stream raises `RequestTimeoutError`."""
    try:
        yield from response.iter_content(chunk_size=None)
    except requests.ConnectionError as exc:
        if exc.args and isinstance(exc.args[0], ReadTimeoutError):
            raise RequestTimeoutError(f"stream stalled: {exc}") from exc
        raise
