"""RMSNorm, optionally fused with the residual add that precedes it.

CUDA tensors take the fused Triton kernel (triton_norm.py, one launch); others the torch path,
which the kernel matches rounding for rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from shardline.shards.layers import custom_kernels
from shardline.shards.layers.linear import frozen

NormOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        """Normalizes x, or with `residual` normalizes x + residual and returns (normed, sum)."""
        if custom_kernels.applies(x):
            from shardline.shards.layers.triton_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_torch(x, self.weight, self.eps, residual)
