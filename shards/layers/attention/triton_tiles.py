"""Triton pieces the paged decode and the varlen prefill kernels share: the dot products'
precision, the head dimension's tile, soft-capping in log2 units, a paged cache's K and V tiles."""

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
def first_key(context_len, WINDOW: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Where a row's tiles start: the first position a query at context_len - 1 sees, rounded
    down to a multiple of 16 where pages hold whole 16-key runs (a keys-contiguous value tile
    must start on one: paged_kv_tiles); key_mask leaves out the keys before the window."""
    first = context_len * 0
    if WINDOW > 0:
        first = tl.maximum(context_len - WINDOW, 0)
        if PAGE_SIZE % 16 == 0:
            first -= first % 16
    return first


@triton.jit
def key_mask(pos, context_len, end, WINDOW: tl.constexpr):
    """The keys at `pos` that a row's query at context_len - 1 attends to, below `end`."""
    mask = pos < end
    if WINDOW > 0:
        mask &= pos >= context_len - WINDOW
    return mask


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
def decode_query(q, FP8_IN_FP16: tl.constexpr):
    """A query to multiply against an FP8 cache in float16 (FP8_IN_FP16) is first clamped into
    float16's range (past it, it would be inf)."""
    if FP8_IN_FP16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@triton.jit
def alibi_log2_slopes(alibi_ptr, heads, g_mask, HAS_ALIBI: tl.constexpr):
    """The heads' ALiBi slopes in log2 units, as the scores (zeros without ALiBi)."""
    slopes = tl.zeros(heads.shape, dtype=tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=g_mask, other=0.0) * 1.4426950408889634
    return slopes


@triton.jit
def attend_tile(
    q, k, v, pos, n_mask, context_len, m_i, l_i, acc, qk_scale, softcap, slopes,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
):  # fmt: skip
    """One K/V tile (keys at `pos`, where `n_mask`) into a decode query's online softmax: the new
    running max `m_i`, sum `l_i` and output `acc` of the query's heads."""
    # k and v come in the query's dtype (paged_kv_tiles): an FP8 cache (--kv-cache-dtype) in
    # float16 for a half-precision query (decode_query); its scales apply outside
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    scores = soft_cap(scores, softcap, SOFTCAP)
    if HAS_ALIBI:
        scores += slopes[:, None] * (pos - context_len + 1).to(tl.float32)[None, :]
    scores = tl.where(n_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def paged_kv_tiles(
    k_cache_ptr,
    v_cache_ptr,
    table_row,
    pos,
    n_mask,
    end,
    kv_head,
    offs_d,
    d_mask,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    PAGE_SIZE: tl.constexpr,
    V_BY_KEYS: tl.constexpr,
    dtype: tl.constexpr,
):
    """The [keys, dims] K and V tiles of KV head `kv_head` at a sequence's positions `pos` (where
    `n_mask`; none at or past `end`), its pages looked up in its block table row `table_row`, as
    `dtype`. V_BY_KEYS: the value pool is keys-contiguous (kv_cache.value_pool) and
    `pos` starts at a multiple of 16: the value tile is read in whole 16-key runs."""
    in_page = pos % PAGE_SIZE
    page_mask = pos // PAGE_SIZE * PAGE_SIZE < end  # a form whose runs Triton sees constant
    page = tl.load(table_row + pos // PAGE_SIZE, mask=page_mask, other=0).to(tl.int64)
    mask = n_mask[:, None] & d_mask[None, :]
    k_rows = page * stride_kb + in_page * stride_kt + kv_head * stride_kh
    k = tl.load(k_cache_ptr + k_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(dtype)
    v_rows = page * stride_vb + in_page * stride_vt + kv_head * stride_vh
    v_offsets = v_rows[:, None] + offs_d[None, :] * stride_vd
    if V_BY_KEYS:
        # one mask per page lets each 16-key run move as one 16-byte copy; what is loaded past
        # n_mask (a page's unwritten tail, keys before a window) is zeroed, as 0 x NaN is NaN
        # (once converted: fewer instructions than on bytes)
        v_offsets = tl.max_contiguous(tl.multiple_of(v_offsets, [16, 16]), [16, 1])
        v = tl.load(v_cache_ptr + v_offsets, mask=page_mask[:, None] & d_mask[None, :], other=0.0)
        v = v.to(dtype)
        v = tl.where(n_mask[:, None], v, tl.zeros_like(v))
    else:
        v = tl.load(v_cache_ptr + v_offsets, mask=mask, other=0.0).to(dtype)
    return k, v
