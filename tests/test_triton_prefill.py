"""Triton varlen causal prefill attention, with and without a cached prefix, against a float64
torch reference on random inputs, and the Triton backend's prefill-write-then-decode.

Runs on CUDA; skipped elsewhere unless TRITON_INTERPRET=1 is set, which runs the same kernels
through Triton's CPU interpreter on smaller problems (a developer aid, slow)."""

from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, INTERPRET  # isort: skip (skips first)

from shardline.shards.layers.attention.torch_native import TorchNativeBackend
from shardline.shards.layers.attention.triton_paged import TritonAttentionBackend
from shardline.shards.layers.attention.triton_prefill import (
    CachedPrefix,
    PrefillConfig,
    varlen_causal_attention,
)
from tests.triton_attention_helpers import (
    DTYPES,
    HEAD_SHAPES,
    KV_LAYOUTS,
    LONG,
    PrefillThenDecode,
    _assert_close_rows,
    _attention_reference,
    _packed_prefill,
    _poison_allocator,
    cached_prefix_meta,
    stale_pools,
)


def _prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    scale: float,
    window: int = 0,
    slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    bounds = cu.tolist()
    parts = [
        _attention_reference(q[a:b], k[a:b], v[a:b], scale, True, window, slopes)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(parts)


PREFILL_LENGTHS = [1, 7, 16, 64, 129, 300] if INTERPRET else [1, 7, 16, 64, 129, 300, 1000, 2500]


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_SHAPES)
@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_matches_reference(
    dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int
) -> None:
    q, k, v, cu = _packed_prefill(PREFILL_LENGTHS, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    _poison_allocator()
    out = varlen_causal_attention(q, k, v, cu, max(PREFILL_LENGTHS), scale)
    _assert_close_rows(out, _prefill_reference(q, k, v, cu, scale), dtype)


@pytest.mark.parametrize("block_n", [16, 64])
@pytest.mark.parametrize("window", [1, 5, 64, 100])
def test_prefill_sliding_window(window: int, block_n: int) -> None:
    q, k, v, cu = _packed_prefill(PREFILL_LENGTHS, 8, 2, 64, DTYPES[0])
    config = PrefillConfig(block_m=64, block_n=block_n)
    _poison_allocator()
    out = varlen_causal_attention(q, k, v, cu, max(PREFILL_LENGTHS), 0.125, config, window)
    _assert_close_rows(out, _prefill_reference(q, k, v, cu, 0.125, window), DTYPES[0])


def test_float32_prefill_is_not_tf32() -> None:
    q, k, v, cu = _packed_prefill([1, 70, 200], 8, 2, 128, torch.float32)
    _poison_allocator()
    out = varlen_causal_attention(q, k, v, cu, 200, 128**-0.5)
    _assert_close_rows(out, _prefill_reference(q, k, v, cu, 128**-0.5), torch.float32)


def test_prefill_many_short_prompts() -> None:
    lengths = torch.randint(1, 65, (24 if INTERPRET else 256,)).tolist()
    q, k, v, cu = _packed_prefill(lengths, 8, 2, 64, torch.float16)
    _poison_allocator()
    out = varlen_causal_attention(q, k, v, cu, max(lengths), 0.125)
    _assert_close_rows(out, _prefill_reference(q, k, v, cu, 0.125), torch.float16)


@pytest.mark.skipif(INTERPRET, reason="the backend needs a CUDA device")
@pytest.mark.parametrize("use_flash_attn", [False, True])
@pytest.mark.parametrize("window", [0, 7])
def test_backend_prefill_write_then_decode(use_flash_attn: bool, window: int) -> None:
    if use_flash_attn:
        pytest.importorskip("flash_attn")
    backend = TritonAttentionBackend(DEVICE, use_flash_attn=use_flash_attn)
    case = PrefillThenDecode.build(num_heads=16, num_kv_heads=4, head_dim=128)
    expected = _prefill_reference(case.q, case.k, case.v, case.cu, case.scale, window)
    case.check(backend, TorchNativeBackend(), expected, window=window)


# (cached prefix, chunk) lengths of a chunked prefill's sequences.
CHUNKED = [(0, 5), (16, 33), (40, 1), (100, 64), (7, 130), (LONG, 70)]


def _chunked_case(dtype: torch.dtype, page_size: int = 16, keys_major: bool = False):
    """Whole sequences q/k/v, the chunks' packed q/k/v, and a paged cache of stale slots
    (stale_pools, V keys-major or not) holding each sequence's prefix (pages shuffled)."""
    num_heads, num_kv_heads, head_dim = 8, 2, 64
    sequences = [
        _packed_prefill([p + n], num_heads, num_kv_heads, head_dim, dtype)[:3] for p, n in CHUNKED
    ]
    width = max(-(-(p + n) // page_size) for p, n in CHUNKED)
    pages = torch.randperm(len(CHUNKED) * width, device=DEVICE).to(torch.int32)
    tables = pages.view(len(CHUNKED), width)
    shape = (len(CHUNKED) * width, page_size, num_kv_heads, head_dim)
    k_cache, v_cache = stale_pools(shape, dtype, keys_major)
    for (prefix, _), (_, k, v), table in zip(CHUNKED, sequences, tables, strict=True):
        positions = torch.arange(prefix, device=DEVICE)
        slots = table[positions // page_size].long() * page_size + positions % page_size
        TorchNativeBackend().write_kv(k[:prefix], v[:prefix], k_cache, v_cache, slots)
    chunks = [[t[p:] for t in seq] for (p, _), seq in zip(CHUNKED, sequences, strict=True)]
    q, k, v = (torch.cat([chunk[i] for chunk in chunks]) for i in range(3))
    cu = torch.tensor([0] + [n for _, n in CHUNKED], device=DEVICE).cumsum(0).to(torch.int32)
    prefix_lens = torch.tensor([p for p, _ in CHUNKED], dtype=torch.int32, device=DEVICE)
    cached = CachedPrefix(prefix_lens, tables, k_cache, v_cache)
    return sequences, (q, k, v, cu), cached


def _chunked_reference(
    sequences, scale: float, window: int, slopes: torch.Tensor | None = None
) -> torch.Tensor:
    return torch.cat([
        _attention_reference(q[p:], k, v, scale, True, window, slopes)
        for (p, _), (q, k, v) in zip(CHUNKED, sequences, strict=True)
    ])  # fmt: skip


@KV_LAYOUTS
@pytest.mark.parametrize("block_n", [16, 64])
@pytest.mark.parametrize("window", [0, 5, 64])
def test_prefill_continues_a_cached_prefix(window: int, block_n: int, keys_major: bool) -> None:
    dtype = DTYPES[0]
    sequences, (q, k, v, cu), cached = _chunked_case(dtype, keys_major=keys_major)
    config = PrefillConfig(block_m=64, block_n=block_n)
    _poison_allocator()
    max_chunk = max(n for _, n in CHUNKED)
    out = varlen_causal_attention(q, k, v, cu, max_chunk, 0.125, config, window, prefix=cached)
    _assert_close_rows(out, _chunked_reference(sequences, 0.125, window), dtype)


@KV_LAYOUTS
@pytest.mark.parametrize("window", [0, 5])
def test_torch_backend_continues_a_cached_prefix(window: int, keys_major: bool) -> None:
    """The CPU backend's chunked prefill against the same reference as the Triton kernel."""
    dtype = DTYPES[0]
    sequences, (q, k, v, cu), cached = _chunked_case(dtype, keys_major=keys_major)
    meta = cached_prefix_meta(q.shape[0], cu, cached)
    out = TorchNativeBackend().prefill(q, k, v, cached.k_cache, cached.v_cache, meta, 0.125, window)
    _assert_close_rows(out, _chunked_reference(sequences, 0.125, window), dtype)
