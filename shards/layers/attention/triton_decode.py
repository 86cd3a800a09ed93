"""Paged decode attention in Triton: GQA-aware, split-K (flash-decoding) for long contexts; the
entry point for both decode schedules (decode_plan.py), the balanced one in
triton_decode_balanced.py.

One program handles every query head that shares a KV head, so each K/V tile is read once per
group. When the batch alone cannot fill the GPU, the context is cut into partitions handled by
separate programs whose partial results are merged (log-sum-exp weighted) by the last of them
to finish, counted in a per-device buffer of counters (a second kernel merges where none is
at hand): one launch a layer less on a short step.

The launch shape depends only on tensor shapes (batch, heads, block-table width), never on
context lengths, and nothing is read back to the host: the call can be captured in a CUDA graph.
Rows whose context length is 0 (padding) produce zeros. With a sliding window W (a constant of
the model, 0 for none) each row sees only its last W keys: the partitions cover those, from a
multiple of the tile on (the keys before the window masked). With
ALiBi slopes each head adds slope * (key position - query position) to its scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.shards.kv_cache import is_keys_major
from shardline.shards.layers.attention.decode_plan import (
    BalancedPlan,
    DecodeConfig,
    SplitPlan,
    check_inputs,
    default_decode_config,
    fills_gpu,
    fp8_in_fp16,
    multiprocessor_count,
    plan_decode,
)
from shardline.shards.layers.attention.merge_counters import last_to_arrive, merge_counters
from shardline.shards.layers.attention.triton_decode_balanced import balanced_decode_attention
from shardline.shards.layers.attention.triton_tiles import (
    LOG2E,
    alibi_log2_slopes,
    attend_tile,
    decode_query,
    dot_precision,
    first_key,
    head_dim_block,
    merge_parts,
    paged_kv_tiles,
    visible_keys,
)
from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs


@triton.jit
def _partition_tiles(context_len, num_splits, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """The keys a row reads, cut into `num_splits` partitions of whole tiles: the first tile's
    key and the tiles of each partition (at least one, so short contexts leave splits unused)."""
    first = first_key(context_len, WINDOW, BLOCK_N)
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
    merged_ptr,
    counter_ptr,
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
    stride_vd,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    stride_mt,
    stride_mh,
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
    V_KEYS_MAJOR: tl.constexpr,
    LAST_MERGES: tl.constexpr,
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
    q = decode_query(q, FP8_IN_FP16)
    slopes = alibi_log2_slopes(alibi_ptr, heads, g_mask, HAS_ALIBI)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + offs_n
        n_mask = visible_keys(pos, end, context_len, WINDOW)
        k, v = paged_kv_tiles(
            k_cache_ptr, v_cache_ptr, table_row, tile_start, end, n_mask, kv_head, offs_d,
            d_mask, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_vd,
            PAGE_SIZE, BLOCK_N, V_KEYS_MAJOR,
        )  # fmt: skip
        m_i, l_i, acc = attend_tile(
            q, k, v, pos, n_mask, context_len, m_i, l_i, acc, qk_scale, softcap, slopes,
            DOT_PRECISION, SOFTCAP, HAS_ALIBI,
        )  # fmt: skip

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(out_ptrs + split * stride_os, out, mask=out_mask)
        lse_row = lse_ptr + seq * stride_lt + heads * stride_lh
        tl.store(lse_row + split, lse, mask=g_mask)
        if LAST_MERGES:
            _merge_if_last(
                out_ptrs, lse_row, merged_ptr + seq * stride_mt + heads[:, None] * stride_mh + offs_d[None, :],
                counter_ptr + seq * tl.num_programs(1) + kv_head, num_splits, context_len, g_mask,
                out_mask, stride_os, BLOCK_N, WINDOW,
            )  # fmt: skip
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_if_last(
    partial_ptrs, lse_row, merged_ptrs, counter_ptr, num_splits, context_len, g_mask, out_mask,
    stride_ps, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """The (row, KV head)'s last split program to finish merges the splits that hold keys into
    `merged_ptrs`."""
    if last_to_arrive(counter_ptr, num_splits):
        first, partition_tiles = _partition_tiles(context_len, num_splits, BLOCK_N, WINDOW)
        used_splits = tl.cdiv(tl.cdiv(context_len - first, BLOCK_N), partition_tiles)
        merged = merge_parts(partial_ptrs, lse_row, used_splits, stride_ps, 1, out_mask, g_mask)
        tl.store(merged_ptrs, merged.to(merged_ptrs.dtype.element_ty), mask=out_mask)


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


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    config: DecodeConfig | None = None,
    plan: SplitPlan | BalancedPlan | None = None,
    window: int = 0,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q [batch, heads, dim] against the paged cache [pages, page_size, kv_heads, dim], each row
    over its last `window` keys when window > 0, with the ALiBi bias of float32 `alibi_slopes`
    [heads] if given, the scaled scores capped at `softcap` (cap * tanh(score / cap)) if set.
    The schedule and tiling are decode_plan's unless given."""
    batch, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    check_inputs(q, k_cache, v_cache, num_heads, num_kv_heads)
    num_sms = multiprocessor_count(q.device)
    fills = fills_gpu(batch, num_kv_heads, num_sms)
    config = config or default_decode_config(q.dtype, k_cache.dtype, fills)
    if plan is None:
        max_tokens = block_tables.shape[1] * page_size
        plan = plan_decode(batch, num_kv_heads, max_tokens, config, k_cache.dtype, num_sms, window)
    if isinstance(plan, BalancedPlan):
        return balanced_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, config, plan, window,
            alibi_slopes, softcap,
        )  # fmt: skip
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
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
        V_KEYS_MAJOR=is_keys_major(v_cache),
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
        *v_cache.stride(),
        block_tables.stride(0),
    )
    qk_scale = scale * LOG2E
    softcap_log2 = softcap * LOG2E if softcap > 0 else 1.0  # unread without SOFTCAP
    if plan.num_splits == 1:
        _paged_decode_kernel[grid](
            *common,
            out,
            out,
            out,
            context_lens,
            alibi,
            qk_scale,
            softcap_log2,
            1,
            *strides,
            *out.stride()[:2],
            0,
            0,
            0,
            0,
            0,
            SPLIT=False,
            LAST_MERGES=False,
            **shape,
        )
        return out
    partial = torch.empty(
        (batch, num_heads, plan.num_splits, head_dim), dtype=torch.float32, device=q.device
    )
    lse = torch.empty((batch, num_heads, plan.num_splits), dtype=torch.float32, device=q.device)
    counters = merge_counters(q.device, batch * num_kv_heads)
    _paged_decode_kernel[grid](
        *common,
        partial,
        lse,
        out,
        context_lens if counters is None else counters,
        alibi,
        qk_scale,
        softcap_log2,
        plan.num_splits,
        *strides,
        *partial.stride()[:3],
        *lse.stride()[:2],
        *out.stride()[:2],
        SPLIT=True,
        LAST_MERGES=counters is not None,
        **shape,
    )
    if counters is not None:
        return out
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
