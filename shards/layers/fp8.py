"""FP8 (float8_e4m3fn) linear layers: weights with one float32 scale per output row, activations
quantized per token on the fly.

A weight W [N, K] is held as Q [N, K] float8_e4m3fn and s [N] float32 with W ~ Q * s[:, None].
On a GPU with FP8 tensor cores (compute capability 8.9 and up) `fp8_linear` quantizes each row
of x the same way (dynamic per-token scales) and multiplies on the tensor cores through
`torch._scaled_mm` with row-wise scales (cuBLASLt / CUTLASS; bfloat16 output, the only one
row-wise scaling takes), the activations quantized by one Triton kernel (triton_fp8_quant.py)
(at every M from 1 to 128 that beat a weight-only Triton GEMM on an H100: RESULTS.md). Elsewhere (CPU, older GPUs, shapes the FP8 GEMM does not take) it
dequantizes the weight and runs a plain matmul: the reference the tests check every loader with.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from shardline.shards.layers import custom_kernels

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# The smallest row maximum a scale is taken from: an all-zero row gets a tiny scale, not 0 / 0.
MIN_AMAX = 1e-12
# torch._scaled_mm needs both GEMM dimensions of the weight divisible by 16.
SCALED_MM_ALIGNMENT = 16


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


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, weight * scale[:, None], bias) in x's dtype, for an FP8 `weight` [N, K]."""
    if scaled_mm_applies(x, weight):
        return scaled_mm_linear(x, weight, scale, bias)
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


@functools.cache
def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Compute capability 8.9 or later: FP8 GEMMs, and FP8 conversions in Triton."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Row-wise scaled FP8 GEMM: x's rows quantized per token (scale_a [M, 1]), the weight's
    per output channel (scale_b [1, N]); mat2 is the weight transposed, i.e. column-major."""
    rows = x.reshape(-1, x.shape[-1])
    if custom_kernels.applies(x):
        from shardline.shards.layers.triton_fp8_quant import quantize_rows_triton

        quantized, row_scale = quantize_rows_triton(rows)
    else:
        quantized, row_scale = quantize_rows(rows)
    out = torch._scaled_mm(
        quantized,
        weight.t(),
        scale_a=row_scale[:, None],
        scale_b=scale[None, :],
        out_dtype=torch.bfloat16,
        use_fast_accum=True,
    )
    out = out.to(x.dtype)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])
