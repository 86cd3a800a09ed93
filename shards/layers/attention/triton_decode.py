"""Paged decode attention in Triton: GQA-aware, split-K (flash-decoding) for long contexts.

One program handles every query head that shares a KV head, so each K/V tile is read once per
group. When the batch alone cannot fill the GPU, the context is cut into partitions handled by
separate programs whose partial results a second kernel merges (log-sum-exp weighted).

The launch shape depends only on tensor shapes (batch, heads, block-table width), never on
context lengths, and nothing is read back to the host: the call can be captured in a CUDA graph.
Rows whose context length is 0 (padding) produce zeros. With a sliding window W (a constant of
the model, 0 for none) each row reads only its last W keys: the partitions cover those. With
ALiBi slopes each head adds slope * (key position - query position) to its scores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from shardline.shards.layers.attention.triton_tiles import (
    LOG2E,
    dot_precision,
    head_dim_block,
    paged_kv_tiles,
    soft_cap,
)
from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs

MAX_SPLITS = 64
PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def default_decode_config(
    dtype: torch.dtype, cache_dtype: torch.dtype | None = None
) -> DecodeConfig:
    """For a query of `dtype` against a cache of `cache_dtype` (default: the same)."""
    if dtype == torch.float32:
        return DecodeConfig(block_n=32)
    if cache_dtype is not None and cache_dtype.itemsize == 1:
        # An FP8 tile of 64 keys puts half a bf16 tile's bytes in flight per pipeline stage,
        # and a program then waits on memory latency: tiles of 128 keys were faster at 5 of 6
        # shapes on an H100 (up to 27 %, benchmarks/RESULTS.md, session 9's sweep).
        return DecodeConfig(block_n=128)
    return DecodeConfig()


@dataclass(frozen=True)
class SplitPlan:
    num_splits: int


@triton.jit
def first_key(context_len, WINDOW: tl.constexpr):
    """The first position a query at context_len - 1 sees."""
    first = context_len * 0
    if WINDOW > 0:
        first = tl.maximum(context_len - WINDOW, 0)
    return first


@triton.jit
def _partition_tiles(context_len, num_splits, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """The keys a row reads, cut into `num_splits` partitions of whole tiles: the first key
    and the tiles of each partition (at least one, so short contexts leave splits unused)."""
    first = first_key(context_len, WINDOW)
    tiles = tl.cdiv(context_len - first, BLOCK_N)
    return first, tl.maximum(tl.cdiv(tiles, num_splits), 1)


# A per-call size: specialized on its value, it would compile new variants after warmup.
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    lse_ptr,
    alibi_ptr,
    qk_scale,
    softcap,
    num_splits,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP8_IN_FP16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    first, partition_tiles = _partition_tiles(context_len, num_splits, BLOCK_N, WINDOW)
    start = first + split * partition_tiles * BLOCK_N
    end = tl.minimum(start + partition_tiles * BLOCK_N, context_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q_ptrs = q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if FP8_IN_FP16:  # within float16's range (a query past it would be inf otherwise)
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    if HAS_ALIBI:  # in log2 units, as the scores
        slopes = tl.load(alibi_ptr + heads, mask=g_mask, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + offs_n
        n_mask = pos < end
        k, v = paged_kv_tiles(
            k_cache_ptr, v_cache_ptr, table_row, pos, n_mask, kv_head, offs_d, d_mask,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, PAGE_SIZE,
        )  # fmt: skip
        # an FP8 cache (--kv-cache-dtype) is read in the query's dtype, or float16 for a
        # half-precision query (FP8_IN_FP16); its scales apply outside
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
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(out_ptrs + split * stride_os, out, mask=out_mask)
        tl.store(lse_ptr + seq * stride_lt + heads * stride_lh + split, lse, mask=g_mask)
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    partial_ptr,
    lse_ptr,
    context_lens_ptr,
    out_ptr,
    num_splits,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    first, partition_tiles = _partition_tiles(context_len, num_splits, BLOCK_N, WINDOW)
    used_splits = tl.cdiv(tl.cdiv(context_len - first, BLOCK_N), partition_tiles)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < used_splits
    lse = tl.load(
        lse_ptr + seq * stride_lt + head * stride_lh + offs_s, mask=s_mask, other=float("-inf")
    )
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    partial_ptrs = (
        partial_ptr
        + seq * stride_pt
        + head * stride_ph
        + offs_s[:, None] * stride_ps
        + offs_d[None, :]
    )
    partial = tl.load(partial_ptrs, mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weights, axis=0)
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.where(total > 0.0, total, 1.0)
    out_ptrs = out_ptr + seq * stride_ot + head * stride_oh + offs_d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's CPU interpreter
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(
    batch: int, num_kv_heads: int, max_tokens: int, block_n: int, num_sms: int, window: int = 0
) -> SplitPlan:
    """No split once (sequence, KV head) programs cover every SM; otherwise about
    PROGRAMS_PER_SM programs per SM, each row's keys cut evenly (in whole tiles) among its
    splits by the kernel. Measured on an H200 (32 query / 8 KV heads, head_dim 128): batch 64
    ran 7-14% slower with 2 splits than with none; batch 1 at 8192 tokens ran 15x faster with
    64 splits than with none.

    Depends on shapes only (max_tokens = block-table width x page size), so a captured CUDA
    graph stays valid for every context length that fits its block table. A sliding window
    caps the keys any row reads at `window`.
    """
    max_keys = min(max_tokens, window) if window else max_tokens
    max_tiles = max(1, triton.cdiv(max_keys, block_n))
    programs = max(1, batch * num_kv_heads)
    wanted = 1 if programs >= num_sms else triton.cdiv(PROGRAMS_PER_SM * num_sms, programs)
    return SplitPlan(max(1, min(wanted, max_tiles, MAX_SPLITS)))


def fp8_in_fp16(cache_dtype: torch.dtype, query_dtype: torch.dtype) -> bool:
    """Whether an FP8 cache is multiplied in float16 against a bf16/fp16 query: Hopper converts
    two FP8 values to float16 in one instruction (exact for e4m3 and e5m2), to bfloat16 only
    through float16 and float32 (with bfloat16 conversions the kernel read an FP8 cache at 41-64 %
    of the copy bandwidth on an H100, a bf16 one at 88-101 %)."""
    return cache_dtype.itemsize == 1 and query_dtype in (torch.bfloat16, torch.float16)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    config: DecodeConfig | None = None,
    plan: SplitPlan | None = None,
    window: int = 0,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q [batch, heads, dim] against the paged cache [pages, page_size, kv_heads, dim], each row
    over its last `window` keys when window > 0, with the ALiBi bias of float32 `alibi_slopes`
    [heads] if given, the scaled scores capped at `softcap` (cap * tanh(score / cap)) if set."""
    config = config or default_decode_config(q.dtype, k_cache.dtype)
    batch, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    check_inputs(q, k_cache, v_cache, num_heads, num_kv_heads)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    if plan is None:
        max_tokens = block_tables.shape[1] * page_size
        num_sms = multiprocessor_count(q.device)
        plan = plan_splits(batch, num_kv_heads, max_tokens, config.block_n, num_sms, window)
    group = num_heads // num_kv_heads
    shape = dict(
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim),
        PAGE_SIZE=page_size,
        BLOCK_N=config.block_n,
        WINDOW=window,
        DOT_PRECISION=dot_precision(q.dtype),
        HAS_ALIBI=alibi_slopes is not None,
        SOFTCAP=softcap > 0,
        FP8_IN_FP16=fp8_in_fp16(k_cache.dtype, q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch(q.device, batch),
    )
    grid = (batch, num_kv_heads, plan.num_splits)
    common = (q, k_cache, v_cache, block_tables, context_lens)
    alibi = q if alibi_slopes is None else alibi_slopes  # a stand-in, unread without ALiBi
    strides = (
        *q.stride()[:2],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
    )
    qk_scale = scale * LOG2E
    softcap_log2 = softcap * LOG2E if softcap > 0 else 1.0  # unread without SOFTCAP
    if plan.num_splits == 1:
        _paged_decode_kernel[grid](
            *common,
            out,
            out,
            alibi,
            qk_scale,
            softcap_log2,
            1,
            *strides,
            *out.stride()[:2],
            0,
            0,
            0,
            SPLIT=False,
            **shape,
        )
        return out
    partial = torch.empty(
        (batch, num_heads, plan.num_splits, head_dim), dtype=torch.float32, device=q.device
    )
    lse = torch.empty((batch, num_heads, plan.num_splits), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[grid](
        *common,
        partial,
        lse,
        alibi,
        qk_scale,
        softcap_log2,
        plan.num_splits,
        *strides,
        *partial.stride()[:3],
        *lse.stride()[:2],
        SPLIT=True,
        **shape,
    )
    _merge_splits_kernel[(batch, num_heads)](
        partial,
        lse,
        context_lens,
        out,
        plan.num_splits,
        *partial.stride()[:3],
        *lse.stride()[:2],
        *out.stride()[:2],
        HEAD_DIM=head_dim,
        BLOCK_D=shape["BLOCK_D"],
        BLOCK_S=triton.next_power_of_2(plan.num_splits),
        BLOCK_N=config.block_n,
        WINDOW=window,
        num_warps=4,
        **pdl_launch(q.device, batch),
    )
    return out


def check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    if k_cache.shape != v_cache.shape or k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"cache shapes {k_cache.shape}/{v_cache.shape} do not match q {q.shape}")
