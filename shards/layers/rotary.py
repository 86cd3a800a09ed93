"""Rotary position embedding (rotate-half layout) with a precomputed cos/sin cache (its scaling
kinds: rope_scaling.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from shardline.shards.layers import custom_kernels
from shardline.shards.layers.rope_scaling import rope_cos_sin

if TYPE_CHECKING:  # the attention package imports this module
    from shardline.shards.layers.attention.metadata import AttentionMetadata


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
        self.max_positions = max_positions
        self.long_from: int | None = None  # LongRoPE: the sequence length that switches factors
        if (scaling or {}).get("rope_type") == "longrope":
            self.long_from = scaling["original_max_position_embeddings"]

    def rows(self, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Each token's cos/sin row: its position, or with LongRoPE, for a token whose sequence
        is longer than the original length by this pass's end, its position in the long
        factors' rows (transformers rotates a whole sequence by its current length)."""
        if self.long_from is None:
            return positions
        longer = _sequence_ends(positions, meta) >= self.long_from
        return positions + self.max_positions * longer

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


def _sequence_ends(positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Each token's sequence's last position in the pass: a decode token's own, a prefill
    token's that of its sequence's last token (see AttentionMetadata for the layout)."""
    if not meta.is_prefill:
        return positions
    decoded = meta.num_decode_tokens
    prompts = positions[decoded:]
    bounds = meta.cu_seqlens.long()
    ends = prompts[bounds[1:] - 1]
    per_token = torch.repeat_interleave(ends, bounds[1:] - bounds[:-1], output_size=len(prompts))
    return torch.cat([positions[:decoded], per_token])
