"""Shardline: an LLM inference server with TGI's REST API, tensor-parallel shards and a paged KV cache.

`from shardline import LLM, SamplingParams` gives the offline engine API; the server's parts
live in `shardline.router`, `shardline.shards` and `shardline.launcher`.
"""

import os
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# gRPC's fork handlers restart its threads in a forked child; a child that then closes the file
# descriptors it inherited before exec (subprocess does) can abort in one of those threads
# ("Check failed: wakeup_fd_->Wakeup().ok()"). Shardline's processes start children (the
# launcher its shards and router, LLM its shard processes) while their gRPC channels are live,
# and never fork without exec: gRPC's fork support only gets in the way. Set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

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
