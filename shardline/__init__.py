"""Shardline: an LLM inference server with TGI's REST API, tensor-parallel shards and a paged KV cache.

`from shardline import LLM, SamplingParams` gives the offline engine API; the server's parts
live in `shardline.router`, `shardline.shards` and `shardline.launcher`.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY_EXPORTS = {
    "LLM": "shardline.llm",
    "RequestOutput": "shardline.llm",
    "CompletionOutput": "shardline.llm",
    "SamplingParams": "shardline.sampling_params",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shardline' has no attribute {name!r}")
    return getattr(import_module(module), name)
