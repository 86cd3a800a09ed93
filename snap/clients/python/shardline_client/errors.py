"""Exceptions raised by the clients, mapped from the server's `{"error", "error_type"}` JSON.

The class names are those of the `text_generation` client, so `except` clauses written for it
keep working once the import is changed.
"""

from __future__ import annotations

import json


class ShardlineError(Exception):
    """Base class of every error the clients raise."""

    def __init__(
        self, message: str, status_code: int | None = None, error_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type


class ValidationError(ShardlineError):
    """The request was rejected: bad parameters, input too long, template error (422)."""


class GenerationError(ShardlineError):
    """Generation failed on the server (424)."""


class OverloadedError(ShardlineError):
    """The server has too many requests in flight (429, `error_type: overloaded`)."""


class IncompleteGenerationError(ShardlineError):
    """The server stopped before the generation finished (500)."""


class BadRequestError(ShardlineError):
    """The request could not be understood (400, 413)."""


class AuthenticationError(ShardlineError):
    """Missing or wrong API key (401, 403)."""


class NotFoundError(ShardlineError):
    """No such route or model (404)."""


class RateLimitExceededError(ShardlineError):
    """Too many requests, without TGI's `overloaded` error type (429)."""


class ShardNotReadyError(ShardlineError):
    """The server is not ready to serve yet (503)."""


class ShardTimeoutError(ShardlineError):
    """A gateway in front of the server timed out (504)."""


class UnknownError(ShardlineError):
    """Any other error answer."""


class RequestTimeoutError(ShardlineError, TimeoutError):
    """No connection or no data from the server within the client's timeout."""


_BY_ERROR_TYPE: dict[str, type[ShardlineError]] = {
    "validation": ValidationError,
    "template_error": ValidationError,
    "missing_template_variable": ValidationError,
    "tool_error": ValidationError,
    "generation": GenerationError,
    "overloaded": OverloadedError,
    "incomplete_generation": IncompleteGenerationError,
    "incomplete_generation_stream": IncompleteGenerationError,
}

_BY_STATUS: dict[int, type[ShardlineError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    413: BadRequestError,
    422: ValidationError,
    424: GenerationError,
    429: RateLimitExceededError,
    503: ShardNotReadyError,
    504: ShardTimeoutError,
}


def error_from_payload(status_code: int, payload: dict) -> ShardlineError:
    """The exception for an error payload; `error_type` decides, else the status code."""
    message = str(payload.get("error", payload))
    error_type = payload.get("error_type")
    error_class = _BY_ERROR_TYPE.get(error_type) or _BY_STATUS.get(status_code, UnknownError)
    return error_class(message, status_code=status_code, error_type=error_type)


def error_from_body(status_code: int, body: str) -> ShardlineError:
    """The exception for a non-200 answer whose body may or may not be TGI's error JSON."""
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        payload = {"error": body.strip() or f"HTTP {status_code}"}
    return error_from_payload(status_code, payload)
