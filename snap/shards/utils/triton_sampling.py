"""The sampler's last step in Triton: seeded Gumbel-max choice, argmax and log-normalizer in one
read of the processed scores.

For every row of scores [B, V] (float32, or 16-bit logits read as float32) it returns the chosen
token (the argmax of the scores, plus Gumbel noise on sampled rows), the log-softmax normalizer
logsumexp(scores) and the chosen token's logprob. The noise is sampling.py's definition, bit for bit: the PCG hash of (seed, step,
token) in uint32, turned into a uniform of 24 bits and into Gumbel noise with libdevice's log, as
torch's CUDA log computes it. It is made in registers, never stored; greedy rows skip it.

Stage one splits each row into chunks (enough programs to fill the GPU at any batch size) and
writes each chunk's max, sum of exp, best noisy score and its token; stage two merges a row's
chunks. No host sync and fixed shapes: both launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_BLOCK = 2048
_PROGRAMS_PER_SM = 4


@triton.jit
def _pcg_hash(value):
    """PCG RXS-M-XS on uint32, as sampling._pcg_hash."""
    state = value * tl.full((), 747796405, tl.uint32) + tl.full((), 2891336453, tl.uint32)
    word = ((state >> ((state >> 28) + 4)) ^ state) * tl.full((), 277803737, tl.uint32)
    return (word >> 22) ^ word


@triton.jit
def _gumbel(token_ids, row_key):
    bits = _pcg_hash(_pcg_hash(token_ids.to(tl.uint32)) ^ row_key)
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
    return -libdevice.log(-libdevice.log(uniform))


# Nothing is specialized on what follows the batch (sizes, where a row's slice starts) but the
# scores' alignment, which the loads need and choose_tokens ensures: a warmed-up server compiles
# nothing at run time.
@triton.jit(
    do_not_specialize=["chunk_size", "num_chunks"],
    do_not_specialize_on_alignment=[
        "sample_ptr",
        "seed_low_ptr",
        "seed_high_ptr",
        "generated_ptr",
        "part_max_ptr",
        "part_sum_ptr",
        "part_best_ptr",
        "part_token_ptr",
    ],
)
def _chunk_kernel(
    scores_ptr,
    sample_ptr,
    seed_low_ptr,
    seed_high_ptr,
    generated_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_best_ptr,
    part_token_ptr,
    vocab_size,
    chunk_size,
    num_chunks,
    stride_row,
    SAMPLING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row_scores = scores_ptr + row.to(tl.int64) * stride_row
    sampled = False
    row_key = tl.full((), 0, tl.uint32)
    if SAMPLING:
        sampled = tl.load(sample_ptr + row) != 0
        seed_low = tl.load(seed_low_ptr + row).to(tl.uint32)
        seed_high = tl.load(seed_high_ptr + row).to(tl.uint32)
        step = tl.load(generated_ptr + row).to(tl.uint32)
        row_key = _pcg_hash(_pcg_hash(_pcg_hash(seed_low) ^ seed_high) ^ step)
    start = chunk * chunk_size
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_token = start
    for offset in range(0, chunk_size, BLOCK):
        block_start = start + offset
        tokens = block_start + tl.arange(0, BLOCK)
        x = tl.load(row_scores + tokens, mask=tokens < vocab_size, other=float("-inf"))
        x = x.to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
        running_max = new_max
        noisy = x
        if sampled:  # a compile-time False without SAMPLING
            noisy = x + _gumbel(tokens, row_key)
        block_best = tl.max(noisy, 0)
        better = block_best > best
        best_token = tl.where(better, block_start + tl.argmax(noisy, 0), best_token)
        best = tl.where(better, block_best, best)
    part = row * num_chunks + chunk
    tl.store(part_max_ptr + part, running_max)
    tl.store(part_sum_ptr + part, running_sum)
    tl.store(part_best_ptr + part, best)
    tl.store(part_token_ptr + part, best_token)


@triton.jit(
    do_not_specialize=["num_chunks"],
    do_not_specialize_on_alignment=[
        "scores_ptr",
        "part_max_ptr",
        "part_sum_ptr",
        "part_best_ptr",
        "part_token_ptr",
        "next_ids_ptr",
        "logprobs_ptr",
        "log_norm_ptr",
    ],
)
def _merge_kernel(
    scores_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_best_ptr,
    part_token_ptr,
    next_ids_ptr,
    logprobs_ptr,
    log_norm_ptr,
    num_chunks,
    stride_row,
    CHUNKS: tl.constexpr,
):
    row = tl.program_id(0)
    chunks = tl.arange(0, CHUNKS)
    valid = chunks < num_chunks
    parts = row * num_chunks + chunks
    part_max = tl.load(part_max_ptr + parts, mask=valid, other=float("-inf"))
    part_sum = tl.load(part_sum_ptr + parts, mask=valid, other=0.0)
    part_best = tl.load(part_best_ptr + parts, mask=valid, other=float("-inf"))
    part_token = tl.load(part_token_ptr + parts, mask=valid, other=0)
    row_max = tl.max(part_max, 0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(part_sum * tl.exp(part_max - shift), 0)
    log_norm = row_max + tl.log(total)
    token = tl.sum(tl.where(chunks == tl.argmax(part_best, 0), part_token, 0), 0)
    chosen = tl.load(scores_ptr + row.to(tl.int64) * stride_row + token).to(tl.float32)
    tl.store(next_ids_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, chosen - log_norm)
    tl.store(log_norm_ptr + row, log_norm)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunking(batch: int, vocab_size: int, device: torch.device) -> tuple[int, int]:
    """(chunk size, chunks per row): about _PROGRAMS_PER_SM programs per SM, whole blocks each,
    so chunks never overlap."""
    wanted = triton.cdiv(_PROGRAMS_PER_SM * _multiprocessors(device), batch)
    chunks = max(1, min(wanted, triton.cdiv(vocab_size, _BLOCK)))
    chunk_size = triton.cdiv(triton.cdiv(vocab_size, chunks), _BLOCK) * _BLOCK
    return chunk_size, triton.cdiv(vocab_size, chunk_size)


def choose_tokens(
    scores: torch.Tensor,
    sample: torch.Tensor,
    seed_low: torch.Tensor,
    seed_high: torch.Tensor,
    generated: torch.Tensor,
    any_sampled: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(next ids [B] int64, their logprobs [B], logsumexp of each row [B]) for scores [B, V]."""
    scores, sample, seed_low, seed_high, generated = (
        t.contiguous() for t in (scores, sample, seed_low, seed_high, generated)
    )
    if scores.data_ptr() % 16:
        scores = scores.clone()
    batch, vocab_size = scores.shape
    chunk_size, chunks = _chunking(batch, vocab_size, scores.device)
    part_max, part_sum, part_best = torch.empty(
        (3, batch, chunks), dtype=torch.float32, device=scores.device
    ).unbind(0)
    part_token = torch.empty((batch, chunks), dtype=torch.int32, device=scores.device)
    _chunk_kernel[(batch, chunks)](
        scores,
        sample,
        seed_low,
        seed_high,
        generated,
        part_max,
        part_sum,
        part_best,
        part_token,
        vocab_size,
        chunk_size,
        chunks,
        scores.stride(0),
        SAMPLING=any_sampled,
        BLOCK=_BLOCK,
        num_warps=8,
    )
    next_ids = torch.empty(batch, dtype=torch.int64, device=scores.device)
    logprobs, log_norm = torch.empty((2, batch), dtype=torch.float32, device=scores.device).unbind(
        0
    )
    _merge_kernel[(batch,)](
        scores,
        part_max,
        part_sum,
        part_best,
        part_token,
        next_ids,
        logprobs,
        log_norm,
        chunks,
        scores.stride(0),
        CHUNKS=triton.next_power_of_2(triton.cdiv(vocab_size, _BLOCK)),
        num_warps=1,
    )
    return next_ids, logprobs, log_norm
