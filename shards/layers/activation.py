"""SiLU(gate) * up over a fused [gate | up] projection output.

CUDA tensors take one Triton launch (triton_activation.py); others the torch path, which the
kernel matches rounding for rounding (SiLU rounded to the input dtype, then the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_torch(gate_up: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    if interleaved:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [..., 2 * n] holding gate then up, or `interleaved` pairs
    (gate j, up j); returns [..., n]."""
    if gate_up.is_cuda:
        from shardline.shards.layers.triton_activation import triton_silu_and_mul

        return triton_silu_and_mul(gate_up, interleaved)
    return silu_and_mul_torch(gate_up, interleaved)


def interleave_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """Rows (or elements) gate then up -> pairs (gate j, up j), along dim 0."""
    width = gate_up.shape[0] // 2
    return torch.stack((gate_up[:width], gate_up[width:]), dim=1).reshape(gate_up.shape)
