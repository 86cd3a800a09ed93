"""Triton pieces the paged decode and the varlen prefill kernels share: the dot products'
precision, the head dimension's tile, soft-capping in log2 units, a paged cache's tile."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores are kept in log2 units (exp2)


def dot_precision(dtype: torch.dtype) -> str:
    """Full float32 products for float32 inputs (token-exact checks), tensor-core rate otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_dim_block(head_dim: int) -> int:
    """The head dimension's tile: a power of two and at least 16, the smallest `tl.dot` takes."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def soft_cap(scores, softcap, SOFTCAP: tl.constexpr):
    """softcap * tanh(scores / softcap) (both in log2 units), or the scores without SOFTCAP."""
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (e^(2x) + 1): exact at both ends, as e^(2x) over- or underflows
        scores = softcap * (
            1.0 - 2.0 / (tl.exp2(scores * (2.0 * 1.4426950408889634 / softcap)) + 1.0)
        )
    return scores


@triton.jit
def paged_tile(cache_ptr, page, in_page, kv_head, offs_d, mask, stride_b, stride_t, stride_h):
    """The [keys, dims] tile of KV head `kv_head` at slots (page, in_page) of a paged cache."""
    ptrs = (
        cache_ptr
        + page[:, None] * stride_b
        + in_page[:, None] * stride_t
        + kv_head * stride_h
        + offs_d[None, :]
    )
    return tl.load(ptrs, mask=mask, other=0.0)
