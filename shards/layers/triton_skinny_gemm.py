"""y = x @ W^T for a few rows of x (decode at small batch): a weight-streaming GEMM in Triton.

At batch 1-16 a decode step's linears only stream their weights; cuBLAS's choice of kernel for
some of those shapes leaves bandwidth unused (too few CTAs for the SMs: Llama-3.1-8B's o_proj
read at about half the card's bandwidth on an H100). Here each program owns BLOCK_N output
features and streams their rows of W once, the rows of x (padded to 16 for the tensor cores)
riding along; the tile sizes are autotuned per weight shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16
_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in (
        (16, 256, 4, 4),
        (16, 512, 4, 3),
        (32, 256, 4, 4),
        (32, 256, 8, 5),
        (32, 512, 8, 3),
        (64, 128, 4, 5),
        (64, 256, 8, 4),
    )
]


@triton.autotune(configs=_CONFIGS, key=["n", "k"])
@triton.jit(do_not_specialize=["m"])
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    m,
    n,
    k,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < m
    n_mask = offs_n < n
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, k, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(w))
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether skinny_gemm takes these operands: at most MAX_ROWS rows, 16-bit floats on CUDA,
    contiguous rows, and K a multiple of every tile's BLOCK_K."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return (
        x.is_cuda
        and 0 < rows <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.stride(-1) == 1
        and x.stride(-1) == 1
        and weight.shape[1] % 512 == 0
    )


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T for at most MAX_ROWS rows of x (see `supports`)."""
    rows = x.reshape(-1, x.shape[-1])
    m, k = rows.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _skinny_gemm_kernel[grid](
        rows, weight, out, m, n, k, rows.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=MAX_ROWS,
    )  # fmt: skip
    return out.view(*x.shape[:-1], n)
