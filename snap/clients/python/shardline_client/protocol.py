"""What the sync and async clients share: settings, request bodies, SSE decoding, retry timing."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Generic, TypeVar

import pydantic

from .errors import ValidationError, error_from_payload
from .types import ChatOptions, Message

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)

GENERATE_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "max_new_tokens": 20,
    "return_full_text": False,
    "watermark": False,
}
STREAM_END = "[DONE]"
RETRIED_STATUS = 429  # TGI's "overloaded"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for 429 answers; `Retry-After` is honoured."""

    max_retries: int = 3
    backoff_factor: float = 0.5
    max_backoff: float = 8.0

    def delay(self, status_code: int, attempt: int, retry_after: str | None) -> float | None:
        """Seconds to wait before retrying failed attempt `attempt` (0-based); None: give up."""
        if status_code != RETRIED_STATUS or attempt >= self.max_retries:
            return None
        backoff = min(self.max_backoff, self.backoff_factor * 2**attempt)
        jittered = random.uniform(backoff / 2, backoff)
        return min(self.max_backoff, max(jittered, _seconds(retry_after)))


def _seconds(retry_after: str | None) -> float:
    try:
        return max(0.0, float(retry_after or 0))
    except ValueError:  # an HTTP date: fall back to our own backoff
        return 0.0


class ClientSettings:
    """Connection settings common to `Client` and `AsyncClient`."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        cookies: Mapping[str, str] | None = None,
        timeout: float = 10,
        api_key: str | None = None,
        max_retries: int = 3,
        backoff_factor: float = 0.5,
        max_backoff: float = 8.0,
    ) -> None:
        """
        Args:
            base_url: the server's address, such as `http://localhost:8080`.
            headers: extra HTTP headers sent with every request.
            cookies: cookies sent with every request.
            timeout: seconds to wait for the connection and for each read; on a stream, the
                longest pause allowed between two tokens.
            api_key: sent as `Authorization: Bearer <api_key>`.
            max_retries: how many times a request answered 429 is retried (0: never).
            backoff_factor: the first retry waits about this many seconds, doubling each time.
            max_backoff: the longest wait between two retries.
        """
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.cookies = dict(cookies or {})
        self.timeout = timeout
        self.retry = RetryPolicy(max_retries, backoff_factor, max_backoff)


@cache
def _adapter(options_type: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(options_type)


def _validated(options_type: type, options: Mapping[str, Any]) -> dict[str, Any]:
    adapter = _adapter(options_type)
    try:
        return adapter.dump_python(adapter.validate_python(options), mode="json", exclude_none=True)
    except pydantic.ValidationError as exc:
        raise ValidationError(f"invalid parameters: {exc}") from exc


def generate_body(prompt: str, options_type: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body of `/generate` and `/generate_stream` (TGI's `GenerateRequest`)."""
    parameters = _validated(options_type, {**GENERATE_DEFAULTS, **options})
    parameters["stop"] = parameters.pop("stop_sequences", [])
    parameters["details"] = True
    return {"inputs": prompt, "parameters": parameters}


def chat_body(
    messages: Sequence[Message | Mapping[str, Any]], stream: bool, options: Mapping[str, Any]
) -> dict[str, Any]:
    """The JSON body of `/v1/chat/completions` (TGI's `ChatRequest`)."""
    body = {"model": "tgi", **_validated(ChatOptions, options), "stream": stream}
    try:
        body["messages"] = [
            Message.model_validate(message).model_dump(mode="json", exclude_none=True)
            for message in messages
        ]
    except pydantic.ValidationError as exc:
        raise ValidationError(f"invalid messages: {exc}") from exc
    return body


def parse_event(data: str, model: type[ModelT], status_code: int) -> ModelT:
    """One SSE event's data as `model`; an error event raises its exception."""
    payload = json.loads(data)
    if isinstance(payload, dict) and "error" in payload:
        raise error_from_payload(status_code, payload)
    return model.model_validate(payload)


class EventStream(Generic[ModelT]):
    """Parses a Server-Sent Events body, fed in chunks of any size, into `model` objects.

    `done` turns true at OpenAI's `data: [DONE]` sentinel; an error event raises its exception.
    """

    def __init__(self, model: type[ModelT], status_code: int) -> None:
        self.model = model
        self.status_code = status_code
        self.done = False
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> Iterator[ModelT]:
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        for line in lines:
            data = self._event_data(line.rstrip(b"\r").decode())
            if data == STREAM_END:
                self.done = True
            if data is None or self.done:
                continue
            yield parse_event(data, self.model, self.status_code)

    def finish(self) -> Iterator[ModelT]:
        """The event left when the body ends without a blank line."""
        return self.feed(b"\n\n")

    def _event_data(self, line: str) -> str | None:
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None
