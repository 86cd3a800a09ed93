"""RMSNorm, optionally fused with the residual add that precedes it.

CUDA tensors take the fused Triton kernel (triton_norm.py, one launch); others the torch path,
which the kernel matches rounding for rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardline.shards.layers import custom_kernels
from shardline.shards.layers.fp8 import FP8Rows, Product, dense, stored, takes_fp8_rows
from shardline.shards.layers.linear import frozen
from shardline.shards.utils.weights import Weights

Normed = torch.Tensor | FP8Rows
NormOutput = Normed | tuple[Normed, torch.Tensor]


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput:
    """RMSNorm(x) * weight, or with `residual` (normed(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return out if residual is None else (out, residual)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.eps = eps

    def forward(
        self,
        x: Product,
        residual: torch.Tensor | None = None,
        quantize_for: nn.Module | None = None,
    ) -> NormOutput:
        """Normalizes x, or with `residual` normalizes x + residual and returns (normed, sum);
        the normed rows as FP8Rows where `quantize_for`, the one layer they feed, takes them."""
        tensor = stored(x)
        if custom_kernels.applies(tensor):
            from shardline.shards.layers.triton_norm import rms_norm

            fp8 = takes_fp8_rows(tensor, quantize_for)
            return rms_norm(x, self.weight, self.eps, residual, fp8=fp8)
        return rms_norm_torch(dense(x), self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (GPT-2, BLOOM, Falcon); the torch kernel on every device."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.bias = frozen(bias)
        self.eps = eps

    @classmethod
    def load(cls, weights: Weights, prefix: str, eps: float) -> LayerNorm:
        return cls(
            weights.get_tensor(f"{prefix}.weight"), weights.get_tensor(f"{prefix}.bias"), eps
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
