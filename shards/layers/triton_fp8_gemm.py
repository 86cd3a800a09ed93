"""Row-scaled FP8 GEMM (W8A8) for decode-sized batches, in Triton: y = (Qx * sx[:, None]) @
(Qw * sw[:, None]).T (+ bias) for activations already quantized per token (fp8.FP8Rows) and an
FP8 weight [N, K] with one float32 scale per output row (fp8.py's runtime form).

cuBLASLt's row-scaled kernels (`torch._scaled_mm`) tile up to a few hundred rows 128 x 128: a
4096-wide projection then has 32 tiles for 132 SMs and streams its weight at 41-56 % of the
copy bandwidth (benchmarks/RESULTS.md, session 15). Here each program owns a BLOCK_M x BLOCK_N
tile and walks K on FP8 tensor cores (both operands e4m3, float32 accumulation), its tiles
software-pipelined (`num_stages`); the programs of one weight strip are adjacent in the launch
order, so the strip comes from HBM once and from L2 for the other row blocks. The row and
weight scales and the bias are the epilogue; the product is written in the activations' dtype.
Per-call row counts are not specialized on (one compile per tiling and weight shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import triton
import triton.language as tl

from shardline.shards.layers import custom_kernels
from shardline.shards.layers.fp8 import FP8Rows
from shardline.shards.layers.pdl import PDL_MAX_ROWS
from shardline.shards.layers.spelled_tiling import SpelledTiling


@dataclass(frozen=True)
class GemmTiling(SpelledTiling):
    LETTERS: ClassVar[str] = "mnkws"
    EXAMPLE: ClassVar[str] = "m64n128k128w4s4"

    block_m: int
    block_n: int
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4


# The rows the Triton GEMM takes; larger calls go to cuBLASLt, and so do the steps of a few rows,
# whose kernels are launched with PDL (pdl.py), which this one is not.
MIN_ROWS = PDL_MAX_ROWS + 1
MAX_ROWS = 128
# Measured on an H100 (benchmarks/RESULTS.md, session 15: the 8B projections, 16-384 rows):
# narrow tiles win for the 4,096- and 6,144-wide projections up to 128 rows (cuBLASLt leaves
# them a few dozen tiles), wide ones for the 28,672-wide gate/up up to 64 rows (WIDE_FROM_N
# parts the two); cuBLASLt wins beyond.
NARROW = GemmTiling(block_m=64, block_n=32, num_warps=4, num_stages=5)
WIDE = GemmTiling(block_m=64, block_n=128, num_warps=4, num_stages=3)
WIDE_FROM_N = 16384
WIDE_MAX_ROWS = 64


def tiling_for(rows: int, n: int) -> GemmTiling | None:
    """The tiling for `rows` rows against an [n, K] weight, or None where cuBLASLt is faster."""
    if not MIN_ROWS <= rows <= MAX_ROWS:
        return None
    if n < WIDE_FROM_N:
        return NARROW
    return WIDE if rows <= WIDE_MAX_ROWS else None


@triton.jit(do_not_specialize=["rows"])
def _fp8_gemm_kernel(
    x_ptr,
    x_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    rows,
    stride_x,
    stride_w,
    stride_out,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row_blocks = tl.cdiv(rows, BLOCK_M)
    pid = tl.program_id(0)
    block_m, block_n = pid % row_blocks, pid // row_blocks  # a weight strip's programs adjacent
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < rows
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :]
    w_tile = w_ptr + offs_n[None, :].to(tl.int64) * stride_w + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in tl.range(0, K // BLOCK_K):
        x = tl.load(x_tile, mask=row_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.load(w_tile), acc)
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    x_scale = tl.load(x_scale_ptr + offs_m, mask=row_mask, other=0.0)
    acc = acc * x_scale[:, None] * tl.load(w_scale_ptr + offs_n)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n)[None, :].to(tl.float32)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_out + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def triton_gemm_applies(rows: FP8Rows, weight: torch.Tensor, tiling: GemmTiling) -> bool:
    """Whether the Triton GEMM with `tiling` takes these rows against `weight` [N, K]: on a GPU
    (FP8 rows exist only where it has FP8 tensor cores), the weight's dimensions whole
    multiples of the tiling's blocks."""
    n, k = weight.shape
    x = rows.quantized
    return (
        custom_kernels.applies(x)
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
        and n % tiling.block_n == 0
        and k % tiling.block_k == 0
    )


def fp8_gemm(
    rows: FP8Rows,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    tiling: GemmTiling,
) -> torch.Tensor:
    """rows [M, K] times the FP8 `weight` [N, K] (scales `scale` [N]) in rows.dtype."""
    x = rows.quantized
    m, n = x.shape[0], weight.shape[0]
    out = torch.empty((m, n), dtype=rows.dtype, device=x.device)
    grid = (triton.cdiv(m, tiling.block_m) * (n // tiling.block_n),)
    _fp8_gemm_kernel[grid](
        x,
        rows.scale,
        weight,
        scale,
        bias if bias is not None else scale,
        out,
        m,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        K=weight.shape[1],
        HAS_BIAS=bias is not None,
        BLOCK_M=tiling.block_m,
        BLOCK_N=tiling.block_n,
        BLOCK_K=tiling.block_k,
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    return out
