"""The router's errors, each with TGI's HTTP status and `error_type`."""

from __future__ import annotations

from http import HTTPStatus


class RouterError(Exception):
    status: int = 500
    error_type: str = "error"

    def to_json(self) -> dict[str, str]:
        return {"error": str(self), "error_type": self.error_type}


class ValidationError(RouterError):
    status = 422
    error_type = "validation"


class ToolError(ValidationError):
    """A tool request that cannot be served (TGI's `tool_error`)."""

    error_type = "tool_error"


class BadRequestError(RouterError):
    """The body is not JSON at all."""

    status = 400
    error_type = "bad_request"


class GenerationError(RouterError):
    status = 424
    error_type = "generation"


class OverloadedError(RouterError):
    status = 429
    error_type = "overloaded"


class IncompleteGenerationError(RouterError):
    status = 500
    error_type = "incomplete_generation"


class UnhealthyError(RouterError):
    status = 503
    error_type = "healthcheck"


class ShuttingDownError(RouterError):
    """SIGTERM arrived: in-flight requests finish, new ones are refused."""

    status = 503
    error_type = "shutting_down"


class UnsupportedMediaTypeError(RouterError):
    status = 415
    error_type = "unsupported_media_type"


class PayloadTooLargeError(RouterError):
    status = 413
    error_type = "payload_too_large"


def error_json(status: int, message: str) -> dict[str, str]:
    """The TGI error JSON of an HTTP error that is not a `RouterError` (an unknown route, a
    wrong method, a request line aiohttp cannot parse): its `error_type` is the status's
    reason phrase in snake case (`method_not_allowed`)."""
    try:
        error_type = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        error_type = "error"
    return {"error": message, "error_type": error_type}
