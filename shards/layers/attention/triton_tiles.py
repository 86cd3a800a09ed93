"""Triton pieces the paged decode and the varlen prefill kernels share: the dot products'
precision, the head dimension's tile, soft-capping in log2 units, a paged cache's K and V tiles,
partial results merged by their log-sum-exp."""

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
def first_key(context_len, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where the tiles of a row whose query sits at context_len - 1 start: at its window's first
    key rounded down to a whole tile (paged_kv_tiles' tiles start at multiples of their runs);
    `visible_keys` masks the keys before the window."""
    first = context_len * 0
    if WINDOW > 0:
        first = tl.maximum(context_len - WINDOW, 0) // BLOCK_N * BLOCK_N
    return first


@triton.jit
def visible_keys(pos, end, context_len, WINDOW: tl.constexpr):
    """Which keys at `pos` before `end` the query at context_len - 1 sees: within its window."""
    visible = pos < end
    if WINDOW > 0:
        visible = visible & (pos >= context_len - WINDOW)
    return visible


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
def merge_parts(part_ptrs, lse_ptrs, count, part_stride, lse_stride, mask, h_mask):
    """`count` partial outputs (normalized, [heads, dims] at part_ptrs + i * part_stride) merged
    by their log-sum-exps (log2 units, at lse_ptrs + i * lse_stride); zeros for none. The loads
    skip L1 (.cg): the parts may come from other SMs in this very launch."""
    m = tl.full(h_mask.shape, float("-inf"), dtype=tl.float32)
    weight = tl.zeros(h_mask.shape, dtype=tl.float32)
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    for i in range(0, count):
        lse = tl.load(lse_ptrs + i * lse_stride, mask=h_mask, other=0.0, cache_modifier=".cg")
        part = tl.load(part_ptrs + i * part_stride, mask=mask, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(lse - m_new)
        weight = weight * alpha + beta
        acc = acc * alpha[:, None] + beta[:, None] * part
        m = m_new
    return acc / tl.where(weight > 0.0, weight, 1.0)[:, None]


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
    # an FP8 cache (--kv-cache-dtype) is read in the query's dtype, or float16 for a
    # half-precision query (decode_query); its scales apply outside
    k, v = k.to(q.dtype), v.to(q.dtype)
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
    tile_start,
    end,
    n_mask,
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
    BLOCK_N: tl.constexpr,
    V_KEYS_MAJOR: tl.constexpr,
):
    """The [BLOCK_N, dims] K and V tiles of KV head `kv_head` at a sequence's keys from
    `tile_start` (a multiple of BLOCK_N; `n_mask`: the keys it sees, all before `end`), its pages
    looked up in its block table row `table_row`, in the cache's dtype. V_KEYS_MAJOR: the V cache
    holds a page's keys contiguous (kv_cache.is_keys_major), its head_dim stride `stride_vd`."""
    pos = tile_start + tl.arange(0, BLOCK_N)
    page = tl.load(table_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    in_page = pos % PAGE_SIZE
    # Every key of the tile is read from K (a key past `n_mask` reads page 0 or a stale slot):
    # its scores are dropped by a select whatever they hold. V keeps the keys' mask, as a zero
    # weight times a NaN in an unwritten slot would still reach the sum; a keys-major V does
    # not (a mask along its contiguous keys would cut its vector loads): its cache holds no NaN.
    k = _paged_tile(
        k_cache_ptr, page, in_page, kv_head, offs_d, d_mask[None, :], stride_kb, stride_kt,
        stride_kh,
    )  # fmt: skip
    if V_KEYS_MAJOR:
        v = _keys_major_tile(
            v_cache_ptr, table_row, tile_start, end, kv_head, offs_d, d_mask, stride_vb,
            stride_vh, stride_vd, PAGE_SIZE, BLOCK_N,
        )  # fmt: skip
    else:
        v = _paged_tile(
            v_cache_ptr, page, in_page, kv_head, offs_d, n_mask[:, None] & d_mask[None, :],
            stride_vb, stride_vt, stride_vh,
        )  # fmt: skip
    return k, v


@triton.jit
def _paged_tile(cache_ptr, page, in_page, kv_head, offs_d, mask, stride_b, stride_t, stride_h):
    """The [keys, dims] tile of KV head `kv_head` at slots (page, in_page) of a paged cache."""
    ptrs = (
        cache_ptr
        + page[:, None] * stride_b
        + in_page[:, None] * stride_t
        + kv_head * stride_h
        + offs_d[None, :]
    )
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _keys_major_tile(
    cache_ptr, table_row, tile_start, end, kv_head, offs_d, d_mask, stride_b, stride_h, stride_d,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The [BLOCK_N, dims] tile of KV head `kv_head` of a keys-major cache from key `tile_start`:
    runs of keys, each within one page looked up once (page 0 from `end` on, so never
    outside the pool), read [runs, dims, keys] along the keys, whatever slots they hold."""
    # a power of two dividing both the page and the tile: a tile starting at a multiple of the
    # tile is cut into runs that each lie within one page
    PAGE_BIT: tl.constexpr = PAGE_SIZE & -PAGE_SIZE
    run: tl.constexpr = BLOCK_N if BLOCK_N < PAGE_BIT else PAGE_BIT
    run_start = tile_start + tl.arange(0, BLOCK_N // run) * run
    # unsigned (none of it is negative): signed / and % and a signed 64-bit product take
    # fix-ups, 25.8 instead of 22.5 instructions a key in the FP8 split kernel (n128w4s5, sm_90)
    unsigned_start = run_start.to(tl.uint32)
    page = tl.load(table_row + unsigned_start // PAGE_SIZE, mask=run_start < end, other=0)
    page_ptrs = cache_ptr + kv_head * stride_h + _unsigned_wide(page) * _unsigned_wide(stride_b)
    in_run = offs_d[:, None] * stride_d + tl.arange(0, run)[None, :]
    in_page = (unsigned_start % PAGE_SIZE).to(tl.int32)[:, None, None] + in_run[None, :, :]
    ptrs = page_ptrs[:, None, None] + in_page
    runs = tl.load(ptrs, mask=d_mask[None, :, None], other=0.0)
    return tl.reshape(tl.permute(runs, (0, 2, 1)), (BLOCK_N, offs_d.shape[0]))


@triton.jit
def _unsigned_wide(x):
    """A non-negative int32 as uint64."""
    return x.to(tl.uint32).to(tl.uint64)
