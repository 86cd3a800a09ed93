"""Python client for Shardline, interface-compatible with the `text_generation` client."""

from .async_client import AsyncClient
from .client import Client
from .errors import (
    AuthenticationError,
    BadRequestError,
    GenerationError,
    IncompleteGenerationError,
    NotFoundError,
    OverloadedError,
    RateLimitExceededError,
    RequestTimeoutError,
    ShardlineError,
    ShardNotReadyError,
    ShardTimeoutError,
    UnknownError,
    ValidationError,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "GenerationError",
    "IncompleteGenerationError",
    "NotFoundError",
    "OverloadedError",
    "RateLimitExceededError",
    "RequestTimeoutError",
    "ShardNotReadyError",
    "ShardTimeoutError",
    "ShardlineError",
    "UnknownError",
    "ValidationError",
]
