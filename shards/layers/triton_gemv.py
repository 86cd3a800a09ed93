"""One-row linear layers (batch-1 decode) in Triton: y = x @ W.T (+ bias), W [N, K] row-major.

At one row a linear layer only streams its weight; cuBLAS reaches 1.3-2.7 TB/s on the 8-67 MB
weights of a 2B model where the copy ceiling is 3 TB/s. Each program here computes BLOCK_N
outputs over the whole of K, its weight tiles loaded one ahead, and with PDL (pdl.py) issues
its first tile before waiting for the kernel before it. Measured on an H100 in one batch-1
graph of the SmolLM2-1.7B shape (benchmarks/RESULTS.md): 2.4-3.1 TB/s on every projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs

MAX_K_TILES = 16


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output rows per program
    block_k: int
    num_warps: int


def gemv_config(n: int, k: int) -> GemvConfig | None:
    """The tiling for an [n, k] weight, or None where the kernel does not apply. Best on the
    H100 for the 1.7B shape: 2 rows x 1024 of K a program, 1 x 2048 for a long K (8192); 2
    warps on small weights (n <= 2048) and long K, 4 otherwise."""
    long_k = k >= 8192
    block_k = 2048 if long_k else 1024
    while block_k > 16 and k % block_k:
        block_k //= 2
    if k % block_k or k // block_k > MAX_K_TILES:
        return None
    num_warps = 2 if long_k or n <= 2048 else 4
    return GemvConfig(block_n=1 if long_k else 2, block_k=block_k, num_warps=num_warps)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    n,
    stride_w,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    w_tile = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)  # depends on no kernel before
    wait_for_inputs(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for tile in tl.static_range(K // BLOCK_K):
        if tile + 1 < K // BLOCK_K:
            next_tile = tl.load(w_ptrs + (tile + 1) * BLOCK_K, mask=n_mask[:, None], other=0.0)
        x = tl.load(x_ptr + tile * BLOCK_K + offs_k).to(tl.float32)
        acc += w_tile.to(tl.float32) * x[None, :]
        if tile + 1 < K // BLOCK_K:
            w_tile = next_tile
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One contiguous half-precision CUDA row against a weight the kernel tiles."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
        and gemv_config(*weight.shape) is not None
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T (+ bias) -> [1, N], as F.linear (check `gemv_applies` first)."""
    n, k = weight.shape
    config = gemv_config(n, k)
    assert config is not None
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        n,
        weight.stride(0),
        K=k,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        HAS_BIAS=bias is not None,
        num_warps=config.num_warps,
        **pdl_launch(x.device),
    )
    return out
