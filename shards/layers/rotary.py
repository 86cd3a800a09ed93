"""Rotary position embedding (rotate-half layout) with a precomputed cos/sin cache (its scaling
kinds: rope_scaling.py)."""

from __future__ import annotations

import torch
from torch import nn

from shardline.shards.layers import custom_kernels
from shardline.shards.layers.rope_scaling import rope_cos_sin


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
        cos, sin = rope_cos_sin(head_dim, max_positions, base, scaling)
        self.register_buffer("cos", cos.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", sin.to(device=device, dtype=dtype), persistent=False)

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
