"""Attention backends and the choice between them.

Backends register a factory under a name; "auto" takes the first registered name in the
device type's preference list.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardline.shards.layers.attention.backend import AttentionBackend
from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.layers.attention.torch_native import TorchNativeBackend
from shardline.shards.layers.attention.triton_paged import TritonAttentionBackend

BackendFactory = Callable[[torch.device], AttentionBackend]

BACKENDS: dict[str, BackendFactory] = {
    "torch": lambda device: TorchNativeBackend(),
    "triton": TritonAttentionBackend,
}
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("triton", "torch")}
FALLBACK = "torch"


def resolve_backend_name(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    preference = AUTO_PREFERENCE.get(device.type, (FALLBACK,))
    return next((n for n in preference if n in BACKENDS), FALLBACK)


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    resolved = resolve_backend_name(name, device)
    factory = BACKENDS.get(resolved)
    if factory is None:
        choices = ", ".join(["auto", *BACKENDS])
        raise ValueError(f"unknown attention backend {name!r}; choose one of: {choices}")
    return factory(device)


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "BACKENDS",
    "get_attention_backend",
]
