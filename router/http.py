"""HTTP plumbing shared by every route module: the app context, JSON bodies, errors, SSE."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from shardline.router.batcher import Batcher
from shardline.router.client import ShardClient
from shardline.router.errors import (
    BadRequestError,
    OverloadedError,
    RouterError,
    ShuttingDownError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from shardline.router.metrics import RouterMetrics
from shardline.router.validation import Validator

logger = logging.getLogger(__name__)

PAYLOAD_LIMIT = 2_000_000
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# What a browser sends cross-site without a preflight: refused, so that a web page cannot drive
# the API from a visitor's browser. Other types (or none) are read as JSON.
_FORM_CONTENT_TYPES = frozenset(
    {"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}
)


@dataclass
class RouterContext:
    """Everything the routes need; shared by the TGI routes and the OpenAI routes."""

    client: ShardClient
    validator: Validator
    batcher: Batcher
    metrics: RouterMetrics
    info: dict[str, Any]
    max_concurrent_requests: int = 128
    api_key: str | None = None
    payload_limit: int = PAYLOAD_LIMIT
    in_flight: int = field(default=0, init=False)
    draining: bool = field(default=False, init=False)

    @contextlib.contextmanager
    def request_slot(self) -> Iterator[None]:
        """Holds one of `max_concurrent_requests` slots; past them, 429; while draining, 503."""
        if self.draining:
            raise ShuttingDownError("the server is shutting down")
        if self.in_flight >= self.max_concurrent_requests:
            raise OverloadedError("Model is overloaded")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def drain(self, timeout_s: float) -> bool:
        """Refuses new requests, waits up to `timeout_s` for in-flight ones; True if all ended."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0


CONTEXT = web.AppKey("router_context", RouterContext)


def context(request: web.Request) -> RouterContext:
    return request.app[CONTEXT]


def error_response(error: RouterError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status)


async def read_json(request: web.Request) -> Any:
    if request.content_type in _FORM_CONTENT_TYPES:
        raise UnsupportedMediaTypeError(
            f"expected `Content-Type: application/json`, got `{request.content_type}`"
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as error:
        raise PayloadTooLargeError(
            f"the body is larger than the limit of {context(request).payload_limit} bytes"
        ) from error
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequestError(f"the body is not valid JSON: {error}") from error


def read_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be a boolean (got {value!r})")
    return value


class PayloadTooLargeError(RouterError):
    status = 413
    error_type = "payload_too_large"


def sse_event(payload: Any) -> bytes:
    """One SSE event, its JSON compact and in UTF-8 as TGI writes it. orjson: one per streamed
    token, where the json module costs ~3 µs of the router's one event loop and orjson 0.3."""
    return b"data:" + orjson.dumps(payload) + b"\n\n"


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterError as error:
        return error_response(error)
    except web.HTTPClientError as error:  # unknown route, wrong method: the same error JSON
        error_type = error.reason.lower().replace(" ", "_")
        return web.json_response(
            {"error": error.reason, "error_type": error_type}, status=error.status
        )


def auth_middleware(api_key: str | None, open_paths: frozenset[str]):
    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if api_key and request.path not in open_paths and not _authorized(request, api_key):
            return web.json_response(
                {"error": "Unauthorized", "error_type": "unauthorized"}, status=401
            )
        return await handler(request)

    return check


def _authorized(request: web.Request, api_key: str) -> bool:
    given = request.headers.get("Authorization", "").encode()
    return hmac.compare_digest(given, f"Bearer {api_key}".encode())
