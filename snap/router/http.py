"""HTTP plumbing shared by every route module: the app context, JSON bodies, errors, SSE."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from shardline.router.batcher import Batcher
from shardline.router.client import ShardClient
from shardline.router.errors import (
    BadRequestError,
    OverloadedError,
    PayloadTooLargeError,
    RouterError,
    ShuttingDownError,
    UnsupportedMediaTypeError,
    ValidationError,
    error_json,
)
from shardline.router.metrics import RouterMetrics
from shardline.router.validation import Validator

logger = logging.getLogger(__name__)

PAYLOAD_LIMIT = 2_000_000
# serde_json's recursion limit, which TGI's bodies go through. orjson stops at 1,024, deep
# enough that the router's own recursive code (repr, schema walks) could still overflow.
MAX_JSON_DEPTH = 128
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
    metrics_without_auth: bool = False  # /metrics open on the main port even with `api_key`
    payload_limit: int = PAYLOAD_LIMIT
    # /health answers 503 once a shard step has run this long (before its hard deadline).
    unready_step_s: float | None = None
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


@contextlib.contextmanager
def counting_failure(ctx: RouterContext) -> Iterator[None]:
    """Counts a request that fails in `tgi_request_failure`, once: under its error type, or as
    `disconnected` when its client went away (a write failed, or aiohttp cancelled the handler
    on the lost connection, which is how most disconnects show)."""
    try:
        yield
    except RouterError as error:
        ctx.metrics.request_failure.inc(err=error.error_type)
        raise
    except (ConnectionError, asyncio.CancelledError):
        ctx.metrics.request_failure.inc(err="disconnected")
        raise


def error_response(error: RouterError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status)


async def read_json(request: web.Request) -> Any:
    if request.content_type in _FORM_CONTENT_TYPES:
        raise UnsupportedMediaTypeError(
            f"expected `Content-Type: application/json`, got `{request.content_type}`"
        )
    too_large = PayloadTooLargeError(
        f"the body is larger than the limit of {context(request).payload_limit} bytes"
    )
    if (request.content_length or 0) > context(request).payload_limit:
        raise too_large  # at once, from the header: no wait for a body that may never come
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as error:
        raise too_large from error
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    """The body as JSON, as TGI's serde_json reads it: 400 past `MAX_JSON_DEPTH` levels, on
    NaN or Infinity, on a number past a double's range, on a lone surrogate or invalid UTF-8.
    An integer past 64 bits is read as a float (so never a Python integer of 5,000 digits)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise BadRequestError(f"the body is not valid JSON: {error}") from error
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(body, MAX_JSON_DEPTH):
        raise BadRequestError(f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
    return body


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels deep, walked without recursion."""
    pending = [(value, 1)]
    while pending:
        container, depth = pending.pop()
        if depth > limit:
            return True
        children = container.values() if isinstance(container, dict) else container
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def read_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be a boolean (got {value!r})")
    return value


def sse_event(payload: Any) -> bytes:
    """One SSE event, its JSON compact and in UTF-8 as TGI writes it. orjson: one per streamed
    token, where the json module costs ~3 µs of the router's one event loop and orjson 0.3."""
    return b"data:" + orjson.dumps(payload) + b"\n\n"


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error in TGI's error JSON: the router's own, aiohttp's (404, 405 with its `Allow`
    header, 413) and, as a 500, any bug."""
    try:
        return await handler(request)
    except RouterError as error:
        return error_response(error)
    except web.HTTPError as error:
        headers = {k: v for k, v in error.headers.items() if k not in _BODY_HEADERS}
        body = error_json(error.status, error.reason)
        return web.json_response(body, status=error.status, headers=headers)
    except web.HTTPException:
        raise  # a redirect or a success raised as an exception: aiohttp answers it
    except Exception:
        logger.exception("unhandled error", extra={"path": request.path})
        return web.json_response(error_json(500, "internal server error"), status=500)


_BODY_HEADERS = frozenset({"Content-Type", "Content-Length"})


class _JsonErrorProtocol(RequestHandler):
    """aiohttp's connection protocol, whose own errors (a request line or header it cannot
    parse, one past its size limits) are TGI's error JSON instead of plain text."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises once bytes went out
        body = error_json(status, message or HTTPStatus(status).phrase)
        response = web.json_response(body, status=status)
        response.force_close()
        return response


class _JsonErrorServer(Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class RouterRunner(web.AppRunner):
    """The AppRunner to serve the router with: protocol-level errors in TGI's error JSON too
    (they never reach the app's middlewares)."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # aiohttp has no hook for the protocol class
        return server


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
