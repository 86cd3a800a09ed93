"""Weight-only FP8 GEMM for a few rows (W8A16 "skinny" GEMM): y = x @ (Q * s[:, None]).T (+ bias)
for bf16/fp16 activations x [M, K] and an FP8 weight Q [N, K] (float8_e4m3fn) with one float32
scale s per output row (fp8.py's runtime form), accumulated in float32, output in x's dtype.

A decode step of a few rows only streams the weights. cuBLAS's row-wise scaled FP8 GEMM
(`torch._scaled_mm`) is not bandwidth-bound at small M and needs the activations quantized
first (another launch per layer). Here each program owns BLOCK_N output columns for all of x's
rows (BLOCK_M at a time, padded to the 16 a tensor-core dot needs) and walks K once, its weight
and x tiles software-pipelined (`num_stages`: cp.async into shared memory on sm_90); it
converts the weight tile to x's dtype in registers (exact: every e4m3 value is a bf16 and an
fp16) and multiplies on the tensor cores with the weight as the dot's left operand; the row
scales and the bias are the epilogue. BLOCK_N shrinks until the programs cover the SMs, so even
a 4096-row weight spreads over the whole GPU; every program re-reads x from L2, 2 * M / BLOCK_N
bytes per weight byte. Launched with PDL (pdl.py) at the few-row sizes that use it, waiting
before its first load.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs

MIN_DOT = 16  # tl.dot's smallest dimension
MAX_BLOCK_M = 64
BLOCK_N_CHOICES = (64, 32, 16)
MIN_SM_SHARE = 0.9  # BLOCK_N is the largest whose programs cover this share of the SMs
STAGE_ELEMENTS = 8192  # weight (and activation) elements per pipeline stage


@dataclass(frozen=True)
class SkinnyConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


def row_block(m: int) -> int:
    """BLOCK_M for M rows: all of them in one tile up to MAX_BLOCK_M."""
    return min(max(MIN_DOT, triton.next_power_of_2(m)), MAX_BLOCK_M)


@functools.cache
def skinny_config(m: int, n: int, k: int, sm_count: int) -> SkinnyConfig:
    """The tiling for M rows against an [n, k] weight on a GPU of `sm_count` SMs."""
    block_m = row_block(m)
    block_n = next(
        (b for b in BLOCK_N_CHOICES if triton.cdiv(n, b) >= MIN_SM_SHARE * sm_count),
        BLOCK_N_CHOICES[-1],
    )
    block_k = STAGE_ELEMENTS // max(block_n, block_m)
    block_k = max(MIN_DOT, min(block_k, triton.next_power_of_2(k)))
    return SkinnyConfig(block_m=block_m, block_n=block_n, block_k=block_k)


@triton.jit
def _skinny_fp8_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    stride_xm,
    stride_wn,
    stride_ym,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    wait_for_inputs(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # y transposed: the weight leads
    for start in tl.range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = start + offs_k < K
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(x), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    acc *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's CPU interpreter: the H100's count, for the same tiles
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def fp8_skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """F.linear(x, weight * scale[:, None], bias) in x's dtype for a bf16/fp16 x [..., K] and a
    float8_e4m3fn `weight` [N, K] (last dimension contiguous) with float32 row `scale`s [N];
    `config` overrides the tiling (the benchmark's sweep)."""
    n, k = weight.shape
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    config = config or skinny_config(m, n, k, _sm_count(x.device))
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    _skinny_fp8_kernel[grid](
        rows,
        weight,
        scale,
        bias if bias is not None else scale,
        out,
        m,
        n,
        rows.stride(0),
        weight.stride(0),
        out.stride(0),
        K=k,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        EVEN_K=k % config.block_k == 0,
        HAS_BIAS=bias is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch(x.device, m),
    )
    return out.view(*x.shape[:-1], n)
