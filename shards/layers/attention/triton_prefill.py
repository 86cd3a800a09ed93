"""Causal varlen flash attention in Triton over packed sequences (used when flash-attn is absent).

Sequences are concatenated along the token axis and delimited by `cu_seqlens`; one program
computes a BLOCK_M tile of queries of one sequence and one head, streaming keys/values of the
same sequence up to the causal diagonal with an online softmax. GQA maps query head h to KV head
h // (num_heads // num_kv_heads). With a sliding window W > 0 the query at position p sees keys
p - W + 1 .. p only, and key tiles below the tile's window are not visited.

Chunked prefill: a sequence may continue a prompt whose first `prefix_len` tokens are cached.
Its queries then sit at positions prefix_len onwards; the program first streams the cached
prefix's keys and values from the paged cache (through the sequence's block table, all visible
but for the window), then its own keys as above.

ALiBi: with per-head slopes each score gains slope * (key position - query position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from shardline.shards.kv_cache import is_keys_major
from shardline.shards.layers.attention.triton_tiles import (
    LOG2E,
    dot_precision,
    head_dim_block,
    paged_kv_tiles,
    soft_cap,
)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_prefill_config(dtype: torch.dtype, head_dim: int = 128) -> PrefillConfig:
    """64x64 tiles with 4 warps beat 128x64 and 128x128 with 8 warps by 10-30% on an H200
    (bf16, head_dim 128, one 8192-token prompt and 64 prompts of 256). Heads wider than 128
    (Gemma's 256) take half the key tile, two stages and 8 warps: the tiles stay within shared
    memory and the accumulator within registers."""
    if head_dim > 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if dtype == torch.float32:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillConfig()


@triton.jit
def _online_softmax_tile(
    q,
    k,
    v,
    visible,
    key_pos,
    query_pos,
    slope,
    m_i,
    l_i,
    acc,
    qk_scale,
    softcap,
    WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Folds one key tile (keys at `key_pos`, queries at `query_pos`; `visible`: which the mask
    shows, the window aside) into the running max `m_i`, sum `l_i` and output `acc`; a row that
    sees no key yet keeps m = -inf and is shifted by 0. The scores are capped at `softcap` when
    SOFTCAP, then gain ALiBi's slope * (key - query) (log2 units, as both) when HAS_ALIBI; keys
    before a query's window are hidden."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    scores = soft_cap(scores, softcap, SOFTCAP)
    if HAS_ALIBI:
        scores += slope * (key_pos[None, :] - query_pos[:, None]).to(tl.float32)
    if WINDOW > 0:
        visible = visible & (key_pos[None, :] > query_pos[:, None] - WINDOW)
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(scores - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _first_visible_key(query_start, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """The first key the query at `query_start` or later may see, rounded down to a tile (where
    triton_tiles.paged_kv_tiles' tiles start)."""
    first = 0
    if WINDOW > 0:
        first = tl.maximum(query_start - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    return first


# Per-call sizes and strides: specialized on their values, they would compile new variants after
# warmup.
@triton.jit(do_not_specialize=["num_m_blocks", "stride_bt"])
def _varlen_causal_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_seqlens_ptr,
    prefix_lens_ptr,
    block_tables_ptr,
    k_cache_ptr,
    v_cache_ptr,
    alibi_ptr,
    qk_scale,
    softcap,
    num_m_blocks,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    stride_vcd,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr,
    V_KEYS_MAJOR: tl.constexpr,
):
    m_block = num_m_blocks - 1 - tl.program_id(0)  # the longest tiles start first
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + seq + 1) - seq_start).to(tl.int32)
    m_start = m_block * BLOCK_M
    if m_start < seq_len:
        kv_head = head // GROUP
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        m_mask = offs_m < seq_len
        rows = seq_start + offs_m
        q_ptrs = q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        slope = 0.0
        if HAS_ALIBI:  # in log2 units, as the scores
            slope = tl.load(alibi_ptr + head) * 1.4426950408889634

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if HAS_PREFIX:
            prefix_len = tl.load(prefix_lens_ptr + seq)
            table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
            query_pos = prefix_len + offs_m
            first = _first_visible_key(prefix_len + m_start, WINDOW, BLOCK_N)
            for n_start in range(first, prefix_len, BLOCK_N):
                pos = n_start + offs_n
                n_mask = pos < prefix_len
                k, v = paged_kv_tiles(
                    k_cache_ptr, v_cache_ptr, table_row, n_start, prefix_len, n_mask, kv_head,
                    offs_d, d_mask, stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct,
                    stride_vch, stride_vcd, PAGE_SIZE, BLOCK_N, V_KEYS_MAJOR,
                )  # fmt: skip
                k, v = k.to(q.dtype), v.to(q.dtype)  # an FP8 cache is read in the query's dtype
                visible = tl.broadcast_to(n_mask[None, :], (BLOCK_M, BLOCK_N))
                m_i, l_i, acc = _online_softmax_tile(
                    q, k, v, visible, pos, query_pos, slope, m_i, l_i, acc, qk_scale, softcap,
                    WINDOW, DOT_PRECISION, HAS_ALIBI, SOFTCAP,
                )  # fmt: skip

        k_base = k_ptr + seq_start * stride_kt + kv_head * stride_kh
        v_base = v_ptr + seq_start * stride_vt + kv_head * stride_vh
        n_first = _first_visible_key(m_start, WINDOW, BLOCK_N)
        for n_start in range(n_first, tl.minimum(seq_len, m_start + BLOCK_M), BLOCK_N):
            cols = n_start + offs_n
            n_mask = cols < seq_len
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(
                k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0
            )
            v = tl.load(
                v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0
            )
            visible = (cols[None, :] <= offs_m[:, None]) & n_mask[None, :]
            m_i, l_i, acc = _online_softmax_tile(
                q, k, v, visible, cols, offs_m, slope, m_i, l_i, acc, qk_scale, softcap,
                WINDOW, DOT_PRECISION, HAS_ALIBI, SOFTCAP,
            )  # fmt: skip

        out = acc / l_i[:, None]
        out_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    config: PrefillConfig | None = None,
    window: int = 0,
    prefix: CachedPrefix | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q [tokens, heads, dim], k/v [tokens, kv_heads, dim] packed by cu_seqlens (int32); each
    query sees its last `window` keys when window > 0, and its sequence's cached `prefix`; with
    float32 `alibi_slopes` [heads], each head's ALiBi bias; with `softcap`, the scaled scores
    capped (cap * tanh(score / cap))."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last (head_dim) dimension")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    num_seqs = cu_seqlens.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0 or max_seqlen == 0:
        return out
    config = config or default_prefill_config(q.dtype, head_dim)
    num_m_blocks = triton.cdiv(max_seqlen, config.block_m)
    _varlen_causal_kernel[(num_m_blocks, num_seqs, num_heads)](
        q,
        k,
        v,
        out,
        cu_seqlens,
        *_prefix_tensors(prefix, cu_seqlens, k, v),
        q if alibi_slopes is None else alibi_slopes,  # a stand-in, unread without ALiBi
        scale * LOG2E,
        softcap * LOG2E if softcap > 0 else 1.0,  # unread without SOFTCAP
        num_m_blocks,
        *q.stride()[:2],
        *k.stride()[:2],
        *v.stride()[:2],
        *out.stride()[:2],
        *_prefix_strides(prefix),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        WINDOW=window,
        DOT_PRECISION=dot_precision(q.dtype),
        HAS_PREFIX=prefix is not None,
        PAGE_SIZE=prefix.k_cache.shape[1] if prefix else 1,
        HAS_ALIBI=alibi_slopes is not None,
        SOFTCAP=softcap > 0,
        V_KEYS_MAJOR=prefix is not None and is_keys_major(prefix.v_cache),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


@dataclass(frozen=True)
class CachedPrefix:
    """The cached prompt prefixes of a chunked prefill: per sequence its length (int32) and
    block table row, in the paged cache [pages, page_size, kv_heads, dim]."""

    prefix_lens: torch.Tensor
    block_tables: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def _prefix_tensors(
    prefix: CachedPrefix | None, cu_seqlens: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The kernel's prefix pointers; without a prefix, unread stand-ins."""
    if prefix is None:
        return cu_seqlens, cu_seqlens, k, v
    return prefix.prefix_lens, prefix.block_tables, prefix.k_cache, prefix.v_cache


def _prefix_strides(prefix: CachedPrefix | None) -> tuple[int, ...]:
    if prefix is None:
        return (0,) * 8
    return (
        prefix.block_tables.stride(0),
        *prefix.k_cache.stride()[:3],
        *prefix.v_cache.stride(),
    )
