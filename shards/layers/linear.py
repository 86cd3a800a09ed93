"""Tensor-parallel linear layers, built from weights already sliced for this rank."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shardline.shards.layers import custom_kernels
from shardline.shards.layers.fp8 import FP8Rows, Product, fp8_linear
from shardline.shards.utils.dist import TPGroup
from shardline.shards.utils.fp8_weights import read_linear, stack_rows
from shardline.shards.utils.weights import Weights


def frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


def linear(
    x: torch.Tensor | FP8Rows,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    defer_scales: bool = False,
) -> Product:
    """F.linear, through the one-row Triton GEMV where it applies (batch-1 decode on a GPU); an
    FP8 weight comes with its per-row `weight_scale` (fp8.py), may take x already quantized
    (FP8Rows, from the kernel that produced x), and with `defer_scales` may return a
    ScaledProduct (for a caller whose next kernel applies the scales)."""
    if isinstance(x, FP8Rows):
        assert weight_scale is not None, "FP8 rows for a layer without an FP8 weight"
        return fp8_linear(x, weight, weight_scale, bias, defer_scales)
    if custom_kernels.applies(x):
        from shardline.shards.layers.triton_gemv import gemv, gemv_applies

        if gemv_applies(x, weight):
            return gemv(x, weight, bias, scale=weight_scale)
    if weight_scale is not None:
        return fp8_linear(x, weight, weight_scale, bias, defer_scales)
    return F.linear(x, weight, bias)


class ColumnParallelLinear(nn.Module):
    """Holds a slice of the output features; the output stays split across ranks."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        weight_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.bias = frozen(bias)
        self.weight_scale = frozen(weight_scale)

    @classmethod
    def load(cls, weights: Weights, prefixes: Sequence[str], bias: bool) -> ColumnParallelLinear:
        """One layer whose output stacks the shards of every `prefixes` projection."""
        weight = stack_rows([read_linear(weights, p, dim=0) for p in prefixes])
        b = weights.get_sharded_concat([f"{p}.bias" for p in prefixes], dim=0) if bias else None
        return cls(weight.weight, b, weight.scale)

    def forward(self, x: torch.Tensor | FP8Rows, defer_scales: bool = False) -> Product:
        return linear(x, self.weight, self.bias, self.weight_scale, defer_scales)


class RowParallelLinear(nn.Module):
    """Holds a slice of the input features; partial outputs are summed over ranks."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tp: TPGroup,
        weight_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.bias = frozen(bias)
        self.weight_scale = frozen(weight_scale)
        self.tp = tp

    @classmethod
    def load(cls, weights: Weights, prefix: str, bias: bool) -> RowParallelLinear:
        weight = read_linear(weights, prefix, dim=1)
        b = weights.get_tensor(f"{prefix}.bias") if bias else None
        return cls(weight.weight, b, weights.tp, weight.scale)

    def forward(self, x: torch.Tensor | FP8Rows, defer_scales: bool = False) -> Product:
        """The output; with `defer_scales` on one rank (nothing to sum) maybe a ScaledProduct."""
        if defer_scales and self.tp.world_size == 1:
            return linear(x, self.weight, self.bias, self.weight_scale, defer_scales=True)
        return self.finish(self.partial(x))

    def partial(self, x: torch.Tensor | FP8Rows) -> torch.Tensor:
        """This rank's part of the output; `finish` sums the parts (one all-reduce may sum
        several layers' parts: Falcon's parallel attention and MLP)."""
        return linear(x, self.weight, weight_scale=self.weight_scale)

    def finish(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's partial output, plus the bias."""
        out = self.tp.all_reduce(partial)
        return out if self.bias is None else out + self.bias
