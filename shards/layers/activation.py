"""SiLU(gate) * up (and tanh-GELU(gate) * up) over a fused [gate | up] projection output.

CUDA tensors take one Triton launch (triton_activation.py); others the torch path, which the
kernel matches rounding for rounding (the activation rounded to the input dtype, then the
product; the kernel's tanh-GELU is x * sigmoid(2z), torch's uses tanh: within float32 rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardline.shards.layers import custom_kernels
from shardline.shards.layers.fp8 import FP8Rows, Product, dense, stored, takes_fp8_rows


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: Product, quantize_for: nn.Module | None = None) -> torch.Tensor | FP8Rows:
    """SiLU(gate) * up for gate_up [..., 2 * n] holding gate then up; returns [..., n], as
    FP8Rows where `quantize_for`, the one layer it feeds, takes them."""
    return _act_and_mul(gate_up, quantize_for, gelu_tanh=False)


def gelu_tanh_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gelu_tanh_and_mul(
    gate_up: Product, quantize_for: nn.Module | None = None
) -> torch.Tensor | FP8Rows:
    """tanh-GELU(gate) * up (GeGLU) for gate_up [..., 2 * n] holding gate then up (FP8Rows as
    silu_and_mul gives them)."""
    return _act_and_mul(gate_up, quantize_for, gelu_tanh=True)


def _act_and_mul(
    gate_up: Product, quantize_for: nn.Module | None, gelu_tanh: bool
) -> torch.Tensor | FP8Rows:
    tensor = stored(gate_up)
    if custom_kernels.applies(tensor):
        from shardline.shards.layers import triton_activation as kernels

        kernel = kernels.triton_gelu_tanh_and_mul if gelu_tanh else kernels.triton_silu_and_mul
        return kernel(gate_up, fp8=takes_fp8_rows(tensor, quantize_for))
    reference = gelu_tanh_and_mul_torch if gelu_tanh else silu_and_mul_torch
    return reference(dense(gate_up))


# transformers' names (ACT2FN) of the GELU variants: exact (erf) or the tanh approximation.
GELU_APPROXIMATIONS = {
    "gelu": "none",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
    "gelu_pytorch_tanh": "tanh",
}


def gelu(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The GELU variant transformers names `activation` (see GELU_APPROXIMATIONS)."""
    return F.gelu(x, approximate=GELU_APPROXIMATIONS[activation])
