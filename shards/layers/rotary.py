"""Rotary position embedding (rotate-half layout) with a precomputed cos/sin cache."""

from __future__ import annotations

import math

import torch
from torch import nn

from shardline.shards.layers import custom_kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    raise ValueError(
        f"rope scaling {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    ramp = ((original_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - ramp) * inv_freq / factor + ramp * inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        base: float,
        scaling: dict | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, base, scaling)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(device=device, dtype=dtype), persistent=False)

    def rotate_(self, heads: torch.Tensor, positions: torch.Tensor) -> None:
        """Rotates heads [T, num_heads, head_dim] in place by the angles of each token's position.

        CUDA tensors take one Triton launch that reads cos/sin by position itself; others the
        torch path (`apply_rotary`), which the kernel matches rounding for rounding.
        """
        if custom_kernels.applies(heads):
            from shardline.shards.layers.triton_rotary import rotate_in_place

            rotate_in_place(heads, positions, self.cos, self.sin)
            return
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        heads.copy_(apply_rotary(heads, cos, sin))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [T, heads, head_dim] by cos/sin [T, 1, head_dim / 2] of its token's position."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
