"""FP8 (float8_e4m3fn) linear layers: weights with one float32 scale per output row, activations
quantized per token on the fly.

A weight W [N, K] is held as Q [N, K] float8_e4m3fn and s [N] float32 with W ~ Q * s[:, None].
On a GPU with FP8 tensor cores (compute capability 8.9 and up) `fp8_linear` quantizes each row
of x the same way (dynamic per-token scales) and multiplies on the tensor cores through
`torch._scaled_mm` with row-wise scales (cuBLASLt / CUTLASS; bfloat16 output, the only one
row-wise scaling takes), or for a decode-sized call a Triton GEMM on the same numbers
(triton_fp8_gemm.py), the activations quantized by one Triton kernel (triton_fp8_quant.py) or
by the norm or SiLU kernel before. A caller whose product a fused RMSNorm or SiLU * up reads
next may ask for it with its scales deferred (ScaledProduct): cuBLASLt's tensor-wise kernels
run it, faster than its row-wise ones at decode sizes, and the reading kernel applies the
scales. Elsewhere (CPU, older GPUs, shapes the FP8 GEMM does not take) it dequantizes the
weight and runs a plain matmul: the reference the tests check every loader with.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from shardline.shards.layers import custom_kernels

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# The smallest row maximum a scale is taken from: an all-zero row gets a tiny scale, not 0 / 0.
MIN_AMAX = 1e-12
# torch._scaled_mm needs both GEMM dimensions of the weight divisible by 16.
SCALED_MM_ALIGNMENT = 16
# The most rows whose product leaves its scales to the next kernel: a decode step's, where the
# GEMM reads its weight and cuBLASLt's tensor-wise kernels do that faster. A prefill's thousands
# of rows keep the row-wise GEMM: the next kernel would read the column scales once a row
# (SiLU * up 28,672 of them a row of the 8B, as many bytes as the row itself).
DEFER_MAX_ROWS = 512


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, K] -> (Q float8_e4m3fn [rows, K], s float32 [rows]) with x ~ Q * s[:, None],
    each row's largest magnitude mapped onto the format's largest (448)."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp(min=MIN_AMAX) / FP8_MAX
    quantized = (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


def dequantize_rows(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Q [rows, K] with s [rows] -> float32 [rows, K]."""
    return quantized.float() * scale[:, None]


class FP8Rows(NamedTuple):
    """Activations [rows, K] already quantized per token (quantize_rows' numbers) by the kernel
    that produced them (a fused RMSNorm or SiLU * up), for a layer `takes_fp8_rows` says
    multiplies through _scaled_mm: one kernel fewer, and one read and write of the rows less."""

    quantized: torch.Tensor  # [rows, K] float8_e4m3fn
    scale: torch.Tensor  # [rows] float32
    dtype: torch.dtype  # the activations' own dtype, which the product comes back in


class ScaledProduct(NamedTuple):
    """An FP8 product [M, N] whose scales the kernel reading it applies: its value is
    (raw * row_scale[:, None] * col_scale[None, :]) rounded to raw's dtype, bfloat16 (what the
    row-wise GEMM would have returned, up to raw's own rounding)."""

    raw: torch.Tensor  # [M, N] bfloat16: the FP8 rows times the FP8 weight, unscaled
    row_scale: torch.Tensor  # [M] float32: the rows' per-token scales
    col_scale: torch.Tensor  # [N] float32: the weight's per-output-row scales

    def value(self) -> torch.Tensor:
        scaled = self.raw.float() * self.row_scale[:, None] * self.col_scale[None, :]
        return scaled.to(self.raw.dtype)


Product = torch.Tensor | ScaledProduct


def dense(x: Product) -> torch.Tensor:
    """x's value as a tensor (a ScaledProduct's scales applied)."""
    return x.value() if isinstance(x, ScaledProduct) else x


def stored(x: Product) -> torch.Tensor:
    """The tensor holding x (a ScaledProduct's raw product: its shape, dtype and device)."""
    return x.raw if isinstance(x, ScaledProduct) else x


def kernel_operands(x: Product) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(stored tensor, row scales, column scales, whether scaled) for a kernel that reads x and
    applies a ScaledProduct's scales itself; a plain tensor stands in for the unread scales."""
    if isinstance(x, ScaledProduct):
        return x.raw, x.row_scale, x.col_scale, True
    return x, x, x, False


def fp8_linear(
    x: torch.Tensor | FP8Rows,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    defer_scales: bool = False,
) -> Product:
    """F.linear(x, weight * scale[:, None], bias) in x's dtype, for an FP8 `weight` [N, K];
    with `defer_scales` (the caller reads a ScaledProduct) one where the GEMM can leave them."""
    if isinstance(x, FP8Rows):
        return scaled_mm_rows(x, weight, scale, bias, defer_scales)
    if scaled_mm_applies(x, weight):
        rows = quantized_rows(x.reshape(-1, x.shape[-1]))
        out = scaled_mm_rows(rows, weight, scale, bias, defer_scales and x.dim() == 2)
        return out if isinstance(out, ScaledProduct) else out.view(*x.shape[:-1], -1)
    return F.linear(x, dequantize_rows(weight, scale).to(x.dtype), bias)


def scaled_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return (
        x.is_cuda
        and has_fp8_tensor_cores(x.device)
        and x.dtype in (torch.bfloat16, torch.float16)
        and n % SCALED_MM_ALIGNMENT == 0
        and k % SCALED_MM_ALIGNMENT == 0
        and weight.is_contiguous()
        and x.numel() > 0
    )


def takes_fp8_rows(x: torch.Tensor, layer: nn.Module | None) -> bool:
    """Whether `layer`, a linear layer, multiplies the 2-D activations `x` will become (x
    itself, or SiLU * up of it) through _scaled_mm: an FP8 weight and more than one row (one
    row takes the GEMV, which reads half-precision x)."""
    weight_scale = getattr(layer, "weight_scale", None)
    return (
        weight_scale is not None
        and x.dim() == 2
        and x.shape[0] > 1
        and custom_kernels.applies(x)
        and scaled_mm_applies(x, layer.weight)
    )


@functools.cache
def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Compute capability 8.9 or later: FP8 GEMMs, and FP8 conversions in Triton."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantized_rows(rows: torch.Tensor) -> FP8Rows:
    """rows [M, K] quantized per token (one Triton launch on a GPU)."""
    if custom_kernels.applies(rows):
        from shardline.shards.layers.triton_fp8_quant import quantize_rows_triton

        quantized, scale = quantize_rows_triton(rows)
    else:
        quantized, scale = quantize_rows(rows)
    return FP8Rows(quantized, scale, rows.dtype)


def scaled_mm_rows(
    rows: FP8Rows,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    defer_scales: bool = False,
) -> Product:
    """Row-wise scaled FP8 GEMM: a call of 9-128 rows runs the Triton GEMM where it measured
    faster (triton_fp8_gemm.tiling_for), any other cuBLASLt's; with `defer_scales`, bfloat16
    rows and no bias, cuBLASLt's unscaled product (a ScaledProduct)."""
    one = defers_scales(rows, bias) if defer_scales else None
    if one is not None:
        return ScaledProduct(_scaled_mm(rows.quantized, weight, one, one), rows.scale, scale)
    if rows.quantized.is_cuda:
        from shardline.shards.layers import triton_fp8_gemm

        tiling = triton_fp8_gemm.tiling_for(rows.quantized.shape[0], weight.shape[0])
        if tiling is not None and triton_fp8_gemm.triton_gemm_applies(rows, weight, tiling):
            return triton_fp8_gemm.fp8_gemm(rows, weight, scale, bias, tiling)
    return cublas_scaled_mm(rows, weight, scale, bias)


def defers_scales(rows: FP8Rows, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The unit scale of a GEMM that can leave its scales to the next kernel (up to
    DEFER_MAX_ROWS bfloat16 rows on a GPU, no bias), else None."""
    if bias is not None or rows.dtype != torch.bfloat16 or not rows.quantized.is_cuda:
        return None
    if rows.quantized.shape[0] > DEFER_MAX_ROWS:
        return None
    return unit_scale(rows.quantized.device)


def cublas_scaled_mm(
    rows: FP8Rows, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """torch._scaled_mm with the rows' per-token scales (scale_a [M, 1]) and the weight's per
    output channel (scale_b [1, N])."""
    out = _scaled_mm(rows.quantized, weight, rows.scale[:, None], scale[None, :]).to(rows.dtype)
    if bias is not None:
        out += bias
    return out


def _scaled_mm(
    quantized: torch.Tensor, weight: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor
) -> torch.Tensor:
    """cuBLASLt's FP8 GEMM in bfloat16; mat2 is the weight transposed, i.e. column-major."""
    return torch._scaled_mm(
        quantized,
        weight.t(),
        scale_a=scale_a,
        scale_b=scale_b,
        out_dtype=torch.bfloat16,
        use_fast_accum=True,
    )


_UNIT_SCALES: dict[torch.device, torch.Tensor] = {}


def unit_scale(device: torch.device) -> torch.Tensor | None:
    """1.0 on `device` for _scaled_mm's tensor-wise scales, made in the first eager call; None
    while a CUDA graph captures before it was made (its memory would be written only when the
    graph replays)."""
    one = _UNIT_SCALES.get(device)
    if one is None and not torch.cuda.is_current_stream_capturing():
        one = _UNIT_SCALES[device] = torch.ones((), dtype=torch.float32, device=device)
    return one
