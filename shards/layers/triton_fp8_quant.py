"""Per-token FP8 quantization of activations in one Triton launch (fp8.quantize_rows' numbers):
one program per row finds the row's largest magnitude, writes the row's scale (amax / 448) and
the row divided by it in float8_e4m3fn. The torch version takes seven kernels and float32
temporaries, per linear layer and step."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.shards.layers import fp8 as fp8_format
from shardline.shards.layers.fp8 import FP8
from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs

BLOCK_K = 1024
# fp8's bounds, as the constants a Triton function may read
FP8_MAX = tl.constexpr(fp8_format.FP8_MAX)
MIN_AMAX = tl.constexpr(fp8_format.MIN_AMAX)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    stride_x,
    stride_q,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in tl.range(0, K, BLOCK_K):
        x = tl.load(x_row + start + offs, mask=start + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = store_row_scale(amax, scale_ptr + row)
    q_row = q_ptr + row * stride_q
    for start in tl.range(0, K, BLOCK_K):
        mask = start + offs < K
        x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_row + start + offs, to_fp8(x, scale, q_ptr), mask=mask)


@triton.jit
def store_row_scale(amax, scale_ptr):
    """A row's scale from `amax` (its magnitudes, or their running maxima: a vector), stored
    at `scale_ptr`: the largest / 448, or a tiny one for a row of zeros."""
    scale = tl.maximum(tl.max(amax, axis=0), MIN_AMAX) / FP8_MAX
    tl.store(scale_ptr, scale)
    return scale


@triton.jit
def to_fp8(x, scale, q_ptr):
    """float32 values of a row divided by its scale, in the FP8 type `q_ptr` points to."""
    return tl.clamp(x / scale, -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As fp8.quantize_rows, for x [rows, K] (last dimension contiguous) on a CUDA device."""
    rows, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    quantized = torch.empty((rows, k), dtype=FP8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(rows,)](
            x,
            quantized,
            scale,
            x.stride(0),
            quantized.stride(0),
            K=k,
            BLOCK_K=min(BLOCK_K, triton.next_power_of_2(k)),
            num_warps=4,
            **pdl_launch(x.device, rows),
        )
    return quantized, scale
