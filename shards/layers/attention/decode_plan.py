"""How a paged decode call runs: its tiling (`DecodeConfig`) and its schedule, chosen from shapes
only (batch, heads, block-table width, dtypes, the device's SMs), never from context lengths, so
that a captured CUDA graph stays valid for every length its block table holds. Plain torch and
math, no Triton, so the CPU tests check it.

Two schedules: `SplitPlan` (triton_decode.py) gives each (row, KV head) a program and, when the
batch cannot fill the GPU, cuts each row's keys into partitions; `BalancedPlan`
(triton_decode_balanced.py) deals the whole batch's key tiles out evenly over a few programs per
SM. Measured on an H100 over ShareGPT-shaped context lengths at 64-512 rows (benchmarks/RESULTS.md,
session 10), the balanced schedule with 5-stage pipelines read a bf16 cache 5-24 % faster than
the split one; for an FP8 cache the split kernel with 5 stages did best at 512 rows and as well at
fewer, so it keeps that one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from shardline.shards.kv_cache import is_keys_major
from shardline.shards.layers.spelled_tiling import SpelledTiling

MAX_SPLITS = 64
SPLIT_PROGRAMS_PER_SM = 4
BALANCED_PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class DecodeConfig(SpelledTiling):
    LETTERS: ClassVar[str] = "nws"  # n64w4s2: tiles of 64 keys, 4 warps, 2 pipeline stages
    EXAMPLE: ClassVar[str] = "n64w4s2"

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class SplitPlan:
    num_splits: int


@dataclass(frozen=True)
class BalancedPlan:
    programs_per_sm: int


def default_decode_config(
    dtype: torch.dtype, cache_dtype: torch.dtype | None = None, fills_gpu: bool = False
) -> DecodeConfig:
    """For a query of `dtype` against a cache of `cache_dtype` (default: the same); `fills_gpu`:
    the batch alone gives every SM a (row, KV head) program. Five pipeline stages double-buffer
    the K/V copies (fewer leave one buffer, the next tile's copy waiting on this one's use), which
    paid at 64-512 rows; smaller batches keep the tilings measured for them."""
    if dtype == torch.float32:
        return DecodeConfig(block_n=32)
    stages = 5 if fills_gpu else 2
    if cache_dtype is not None and cache_dtype.itemsize == 1:
        # An FP8 tile of 64 keys puts half a bf16 tile's bytes in flight per pipeline stage,
        # and a program then waits on memory latency: tiles of 128 keys were faster at 5 of 6
        # shapes on an H100 (up to 27 %, benchmarks/RESULTS.md, session 9's sweep).
        return DecodeConfig(block_n=128, num_stages=stages)
    return DecodeConfig(num_stages=stages)


def plan_splits(
    batch: int, num_kv_heads: int, max_tokens: int, block_n: int, num_sms: int, window: int = 0
) -> SplitPlan:
    """No split once (sequence, KV head) programs cover every SM; otherwise about
    SPLIT_PROGRAMS_PER_SM programs per SM, each row's keys cut evenly (in whole tiles) among its
    splits by the kernel. Measured on an H200 (32 query / 8 KV heads, head_dim 128): batch 64
    ran 7-14% slower with 2 splits than with none; batch 1 at 8192 tokens ran 15x faster with
    64 splits than with none.

    Depends on shapes only (max_tokens = block-table width x page size), so a captured CUDA
    graph stays valid for every context length that fits its block table. A sliding window
    caps the keys any row reads at `window`.
    """
    max_keys = min(max_tokens, window) if window else max_tokens
    max_tiles = max(1, math.ceil(max_keys / block_n))
    programs = max(1, batch * num_kv_heads)
    wanted = 1 if programs >= num_sms else math.ceil(SPLIT_PROGRAMS_PER_SM * num_sms / programs)
    return SplitPlan(max(1, min(wanted, max_tiles, MAX_SPLITS)))


def fills_gpu(batch: int, num_kv_heads: int, num_sms: int) -> bool:
    return batch * num_kv_heads >= num_sms


def plan_decode(
    batch: int,
    num_kv_heads: int,
    max_tokens: int,
    config: DecodeConfig,
    cache_dtype: torch.dtype,
    num_sms: int,
    window: int = 0,
) -> SplitPlan | BalancedPlan:
    """The balanced schedule for a half-precision cache once the batch fills the GPU; else the
    split schedule (plan_splits)."""
    if cache_dtype.itemsize == 2 and fills_gpu(batch, num_kv_heads, num_sms):
        return BalancedPlan(BALANCED_PROGRAMS_PER_SM)
    return plan_splits(batch, num_kv_heads, max_tokens, config.block_n, num_sms, window)


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's CPU interpreter
        return 1
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def fp8_in_fp16(cache_dtype: torch.dtype, query_dtype: torch.dtype) -> bool:
    """Whether an FP8 cache is multiplied in float16 against a bf16/fp16 query: Hopper converts
    two FP8 values to float16 in one instruction (exact for e4m3 and e5m2), to bfloat16 only
    through float16 and float32 (with bfloat16 conversions the kernel read an FP8 cache at 41-64 %
    of the copy bandwidth on an H100, a bf16 one at 88-101 %)."""
    return cache_dtype.itemsize == 1 and query_dtype in (torch.bfloat16, torch.float16)


def check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q and k_cache need a contiguous last (head_dim) dimension")
    if v_cache.stride(-1) != 1 and not is_keys_major(v_cache):
        raise ValueError("v_cache needs a contiguous head_dim or keys (kv_cache.is_keys_major)")
    if k_cache.shape != v_cache.shape or k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"cache shapes {k_cache.shape}/{v_cache.shape} do not match q {q.shape}")
