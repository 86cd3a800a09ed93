"""Paged decode attention with the batch's key tiles dealt out evenly over a fixed set of programs.

The split kernel (triton_decode.py) gives each (row, KV head) its own program: with the short,
uneven contexts of a large batch mid-run (a few tiles per row) each program pays its start-up
(context length, query, first page-table and K/V loads, one after the other) for little work,
and the last programs leave SMs idle. Here the tiles of every row, laid end to end, are cut into
equal runs, one per program (a few per SM, for each KV head): a program walks its run across row
boundaries in one pipelined loop, writing a row's output itself when the row lies wholly in its
run, else the row's part (normalized, with its log-sum-exp) to a scratch slot. A program holds at
most two such parts (its run's first and last rows); after its loop it counts itself in for
each, and the last of a row's programs merges the row's parts (a second kernel merges where no
counters are at hand). It pays where rows are short and many (decode_plan.py has the figures);
its merge walks a row's parts one by one, so a few long rows are the split kernel's.

The slot of a row's part is row + program: along the runs both only grow, so no two parts share
one. Launch shapes depend only on tensor shapes and the device: the call can be captured in a
CUDA graph. Rows of context length 0 (padding) produce zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.shards.kv_cache import is_keys_major
from shardline.shards.layers.attention.decode_plan import (
    BalancedPlan,
    DecodeConfig,
    check_inputs,
    fp8_in_fp16,
    multiprocessor_count,
)
from shardline.shards.layers.attention.merge_counters import last_to_arrive, merge_counters
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

# The rows' tile counts are summed over a vector of at least this many rows, so that a batch
# size compiles no variant of its own below it (the CUDA graphs' buckets reach 512).
MIN_BLOCK_B = 512


@triton.jit
def _row_tiles(context_lens_ptr, batch, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
               WINDOW: tl.constexpr):  # fmt: skip
    """Every row's tile count and where its tiles end along the run of all rows' tiles."""
    rows = tl.arange(0, BLOCK_B)
    lens = tl.load(context_lens_ptr + rows, mask=rows < batch, other=0)
    tiles = tl.cdiv(lens - first_key(lens, WINDOW, BLOCK_N), BLOCK_N)
    return tiles, tl.cumsum(tiles, 0)


@triton.jit
def _row_of_tile(t, ends, total):
    """The row of tile t, and where its tiles begin and end along the run of all tiles."""
    row = tl.sum((ends <= t).to(tl.int32), 0)
    row_begin = tl.max(tl.where(ends <= t, ends, 0), 0)
    row_end = tl.min(tl.where(ends > t, ends, total), 0)
    return row, row_begin, row_end


# Per-call sizes: specialized on their values, they would compile new variants after warmup.
@triton.jit(do_not_specialize=["batch", "stride_bt"])
def _balanced_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_ptr,
    lse_ptr,
    counter_ptr,
    alibi_ptr,
    qk_scale,
    softcap,
    batch,
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
    stride_pt,
    stride_ph,
    stride_lt,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
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
    program = tl.program_id(0)
    kv_head = tl.program_id(1)
    tiles, ends = _row_tiles(context_lens_ptr, batch, BLOCK_B, BLOCK_N, WINDOW)
    total = tl.sum(tiles, 0)
    run = tl.cdiv(total, tl.num_programs(0))
    run_start = program * run
    run_end = tl.minimum(run_start + run, total)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    qd_mask = g_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    slopes = alibi_log2_slopes(alibi_ptr, heads, g_mask, HAS_ALIBI)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for t in range(run_start, run_end):
        row, row_begin, row_end = _row_of_tile(t, ends, total)
        context_len = tl.load(context_lens_ptr + row)
        tile_start = first_key(context_len, WINDOW, BLOCK_N) + (t - row_begin) * BLOCK_N
        pos = tile_start + offs_n
        n_mask = visible_keys(pos, context_len, context_len, WINDOW)
        q = tl.load(
            q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=qd_mask,
            other=0.0,
        )
        q = decode_query(q, FP8_IN_FP16)
        table_row = block_tables_ptr + row.to(tl.int64) * stride_bt
        k, v = paged_kv_tiles(
            k_cache_ptr, v_cache_ptr, table_row, tile_start, context_len, n_mask, kv_head,
            offs_d, offs_d < HEAD_DIM, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
            stride_vh, stride_vd, PAGE_SIZE, BLOCK_N, V_KEYS_MAJOR,
        )  # fmt: skip
        m_i, l_i, acc = attend_tile(
            q, k, v, pos, n_mask, context_len, m_i, l_i, acc, qk_scale, softcap, slopes,
            DOT_PRECISION, SOFTCAP, HAS_ALIBI,
        )  # fmt: skip
        if (t == row_end - 1) | (t == run_end - 1):  # the row, or this program's part of it, ends
            out = acc / l_i[:, None]
            if (row_begin >= run_start) & (row_end <= run_end):  # the whole row: its output
                out_ptrs = out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
                tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=qd_mask)
            else:  # a part, merged later
                slot = row + program
                part_ptrs = (
                    part_ptr + slot * stride_pt + heads[:, None] * stride_ph + offs_d[None, :]
                )
                tl.store(part_ptrs, out, mask=qd_mask)
                tl.store(lse_ptr + slot * stride_lt + heads, m_i + tl.log2(l_i), mask=g_mask)
            m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    if LAST_MERGES:
        counters = counter_ptr + kv_head
        if run_start < run_end:  # its run's first and last rows, where other programs share them
            row, row_begin, row_end = _row_of_tile(run_start, ends, total)
            if (row_begin < run_start) | (row_end > run_end):
                _merge_if_last(
                    row, row_begin // run, (row_end - 1) // run, part_ptr, lse_ptr, out_ptr,
                    counters, stride_pt, stride_ph, stride_lt, stride_ot, stride_oh, heads, offs_d,
                    qd_mask, g_mask,
                )  # fmt: skip
            last_row, _, row_end = _row_of_tile(run_end - 1, ends, total)
            if (last_row != row) & (row_end > run_end):
                _merge_if_last(
                    last_row, program, (row_end - 1) // run, part_ptr, lse_ptr, out_ptr,
                    counters, stride_pt, stride_ph, stride_lt, stride_ot, stride_oh, heads, offs_d,
                    qd_mask, g_mask,
                )  # fmt: skip
        _zero_empty_rows(tiles, batch, program, out_ptr, stride_ot, stride_oh, heads, offs_d,
                         qd_mask, BLOCK_B, BLOCK_G, BLOCK_D)  # fmt: skip


@triton.jit
def _merge_if_last(row, first_program, last_program, part_ptr, lse_ptr, out_ptr, counters,
                   stride_pt, stride_ph, stride_lt, stride_ot, stride_oh, heads, offs_d, qd_mask,
                   g_mask):  # fmt: skip
    """The last of the row's programs to finish merges its parts into the output (`counters`:
    the KV head's, one per row at a stride of the KV heads)."""
    parts = last_program - first_program + 1
    if last_to_arrive(counters + row * tl.num_programs(1), parts):
        slot = row + first_program
        out = merge_parts(
            part_ptr + slot * stride_pt + heads[:, None] * stride_ph + offs_d[None, :],
            lse_ptr + slot * stride_lt + heads, parts, stride_pt, stride_lt, qd_mask, g_mask,
        )  # fmt: skip
        out_ptrs = out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _zero_empty_rows(tiles, batch, program, out_ptr, stride_ot, stride_oh, heads, offs_d,
                     qd_mask, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr,
                     BLOCK_D: tl.constexpr):  # fmt: skip
    """Zeros for this KV head's heads of the rows without keys (padding) dealt to this program:
    rows program, program + programs, ..."""
    rows = tl.arange(0, BLOCK_B)
    mine = ((tiles == 0) & (rows < batch) & (rows % tl.num_programs(0) == program)).to(tl.int32)
    count = tl.sum(mine, 0)
    if count > 0:
        order = tl.cumsum(mine, 0)
        zeros = tl.zeros([BLOCK_G, BLOCK_D], dtype=out_ptr.dtype.element_ty)
        for i in range(count):
            row = tl.sum(tl.where((mine == 1) & (order == i + 1), rows, 0), 0)
            out_ptrs = out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(out_ptrs, zeros, mask=qd_mask)


@triton.jit(do_not_specialize=["batch", "programs"])
def _merge_parts_kernel(
    part_ptr,
    lse_ptr,
    context_lens_ptr,
    out_ptr,
    batch,
    programs,
    stride_pt,
    stride_ph,
    stride_lt,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One row, all heads: its parts merged (log-sum-exp weighted) where programs shared it,
    zeros where it had no keys, nothing where one program wrote it whole."""
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0)
    tiles, ends = _row_tiles(context_lens_ptr, batch, BLOCK_B, BLOCK_N, WINDOW)
    run = tl.cdiv(tl.sum(tiles, 0), programs)
    rows = tl.arange(0, BLOCK_B)
    row_end = tl.sum(tl.where(rows == row, ends, 0), 0)
    row_tiles = tl.sum(tl.where(rows == row, tiles, 0), 0)
    first_program = (row_end - row_tiles) // tl.maximum(run, 1)
    last_program = (row_end - 1) // tl.maximum(run, 1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hd_mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    out_ptrs = out_ptr + row * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    if row_tiles == 0:
        tl.store(out_ptrs, tl.zeros([BLOCK_H, BLOCK_D], dtype=out_ptr.dtype.element_ty),
                 mask=hd_mask)  # fmt: skip
    elif first_program < last_program:
        slot = row + first_program
        out = merge_parts(
            part_ptr + slot * stride_pt + offs_h[:, None] * stride_ph + offs_d[None, :],
            lse_ptr + slot * stride_lt + offs_h, last_program - first_program + 1, stride_pt,
            stride_lt, hd_mask, offs_h < NUM_HEADS,
        )  # fmt: skip
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=hd_mask)


def balanced_programs(num_kv_heads: int, num_sms: int, programs_per_sm: int) -> int:
    """Programs for each KV head: `programs_per_sm` per SM over all KV heads."""
    return max(1, triton.cdiv(programs_per_sm * num_sms, num_kv_heads))


def balanced_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    config: DecodeConfig,
    plan: BalancedPlan,
    window: int = 0,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """As triton_decode.paged_decode_attention (same arguments and result), the batch's tiles
    dealt out evenly over `plan.programs_per_sm` programs per SM."""
    batch, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    check_inputs(q, k_cache, v_cache, num_heads, num_kv_heads)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    programs = balanced_programs(num_kv_heads, multiprocessor_count(q.device), plan.programs_per_sm)
    part = torch.empty((batch + programs, num_heads, head_dim), dtype=torch.float32,
                       device=q.device)  # fmt: skip
    lse = torch.empty((batch + programs, num_heads), dtype=torch.float32, device=q.device)
    block_b = max(MIN_BLOCK_B, triton.next_power_of_2(batch))
    block_d = head_dim_block(head_dim)
    pdl = pdl_launch(q.device, batch)
    counters = merge_counters(q.device, batch * num_kv_heads)
    _balanced_decode_kernel[(programs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, lse,
        context_lens if counters is None else counters,  # a stand-in, unread without counters
        q if alibi_slopes is None else alibi_slopes,  # a stand-in, unread without ALiBi
        scale * LOG2E,
        softcap * LOG2E if softcap > 0 else 1.0,  # unread without SOFTCAP
        batch, *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride(),
        block_tables.stride(0), *out.stride()[:2], *part.stride()[:2], lse.stride(0),
        GROUP=num_heads // num_kv_heads,
        BLOCK_G=max(16, triton.next_power_of_2(num_heads // num_kv_heads)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=page_size, BLOCK_N=config.block_n,
        BLOCK_B=block_b, WINDOW=window, DOT_PRECISION=dot_precision(q.dtype),
        HAS_ALIBI=alibi_slopes is not None, SOFTCAP=softcap > 0,
        FP8_IN_FP16=fp8_in_fp16(k_cache.dtype, q.dtype), V_KEYS_MAJOR=is_keys_major(v_cache),
        LAST_MERGES=counters is not None, num_warps=config.num_warps,
        num_stages=config.num_stages, **pdl,
    )  # fmt: skip
    if counters is not None:
        return out
    _merge_parts_kernel[(batch,)](
        part, lse, context_lens, out, batch, programs, *part.stride()[:2], lse.stride(0),
        *out.stride()[:2], NUM_HEADS=num_heads, BLOCK_H=triton.next_power_of_2(num_heads),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=config.block_n, BLOCK_B=block_b,
        WINDOW=window, num_warps=4, **pdl,
    )  # fmt: skip
    return out
