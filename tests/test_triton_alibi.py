"""ALiBi in the Triton attention kernels (paged decode, varlen prefill with and without a cached
prefix, the backend's prefill-then-decode) and the unrotated KV-cache write, against the float64
reference (tests/triton_attention_helpers.py).

Runs on CUDA; skipped elsewhere unless TRITON_INTERPRET=1 is set (Triton's CPU interpreter)."""

from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, INTERPRET  # isort: skip (skips first)

from shardline.shards.kv_cache import allocate_pool
from shardline.shards.layers.alibi import alibi_slopes
from shardline.shards.layers.attention.decode_plan import DecodeConfig, SplitPlan
from shardline.shards.layers.attention.torch_native import TorchNativeBackend
from shardline.shards.layers.attention.triton_decode import paged_decode_attention
from shardline.shards.layers.attention.triton_kv_write import write_kv_cache
from shardline.shards.layers.attention.triton_paged import TritonAttentionBackend
from shardline.shards.layers.attention.triton_prefill import PrefillConfig, varlen_causal_attention
from tests.test_triton_prefill import (
    CHUNKED,
    PREFILL_LENGTHS,
    _chunked_case,
    _chunked_reference,
    _prefill_reference,
)
from tests.triton_attention_helpers import (
    DTYPES,
    KV_LAYOUTS,
    LONG,
    PagedCase,
    PrefillThenDecode,
    _assert_close_rows,
    _packed_prefill,
    _poison_allocator,
    _random,
    cached_prefix_meta,
)

# (query heads, KV heads): 12 and 6 heads are no power of two (the slopes' second series).
ALIBI_HEADS = [(8, 2), (12, 3), (6, 6)]
CONTEXTS = [0, 1, 15, 17, 64, 257, LONG]


def _slopes(num_heads: int) -> torch.Tensor:
    return alibi_slopes(num_heads).to(DEVICE)


@KV_LAYOUTS
@pytest.mark.parametrize("splits", ["auto", 1, 5])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), ALIBI_HEADS)
@pytest.mark.parametrize("dtype", [DTYPES[0], torch.float32])
def test_decode_alibi(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, splits, keys_major: bool
) -> None:
    case = PagedCase(CONTEXTS, num_heads, num_kv_heads, 64, dtype, keys_major=keys_major)
    slopes = _slopes(num_heads)
    plan = None if splits == "auto" else SplitPlan(int(splits))
    _poison_allocator()
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale,
        DecodeConfig(), plan, alibi_slopes=slopes,
    )  # fmt: skip
    _assert_close_rows(out, case.reference(slopes), dtype)


@KV_LAYOUTS
def test_decode_alibi_with_window(keys_major: bool) -> None:
    case = PagedCase(CONTEXTS, 8, 2, 64, DTYPES[0], keys_major=keys_major)
    case.slide(37)
    slopes = _slopes(8)
    _poison_allocator()
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale,
        DecodeConfig(block_n=16), SplitPlan(3), window=37, alibi_slopes=slopes,
    )  # fmt: skip
    _assert_close_rows(out, case.reference(slopes), DTYPES[0])


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), ALIBI_HEADS)
@pytest.mark.parametrize("dtype", [DTYPES[0], torch.float32])
def test_prefill_alibi(dtype: torch.dtype, num_heads: int, num_kv_heads: int) -> None:
    q, k, v, cu = _packed_prefill(PREFILL_LENGTHS, num_heads, num_kv_heads, 64, dtype)
    slopes = _slopes(num_heads)
    _poison_allocator()
    out = varlen_causal_attention(q, k, v, cu, max(PREFILL_LENGTHS), 0.125, alibi_slopes=slopes)
    _assert_close_rows(out, _prefill_reference(q, k, v, cu, 0.125, 0, slopes), dtype)


@KV_LAYOUTS
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("block_n", [16, 64])
def test_prefill_alibi_continues_a_cached_prefix(
    block_n: int, window: int, keys_major: bool
) -> None:
    dtype = DTYPES[0]
    sequences, (q, k, v, cu), cached = _chunked_case(dtype, keys_major=keys_major)
    slopes = _slopes(q.shape[1])
    config = PrefillConfig(block_m=64, block_n=block_n)
    _poison_allocator()
    max_chunk = max(n for _, n in CHUNKED)
    out = varlen_causal_attention(
        q, k, v, cu, max_chunk, 0.125, config, window, prefix=cached, alibi_slopes=slopes
    )
    _assert_close_rows(out, _chunked_reference(sequences, 0.125, window, slopes), dtype)


def test_torch_backend_alibi_continues_a_cached_prefix() -> None:
    """The CPU backend's ALiBi against the same reference as the kernels."""
    dtype = DTYPES[0]
    sequences, (q, k, v, cu), cached = _chunked_case(dtype)
    slopes = _slopes(q.shape[1])
    meta = cached_prefix_meta(q.shape[0], cu, cached)
    backend = TorchNativeBackend()
    out = backend.prefill(q, k, v, cached.k_cache, cached.v_cache, meta, 0.125, 0, slopes)
    _assert_close_rows(out, _chunked_reference(sequences, 0.125, 0, slopes), dtype)


@pytest.mark.skipif(INTERPRET, reason="the backend needs a CUDA device")
@pytest.mark.parametrize("use_flash_attn", [False, True])
def test_backend_alibi_prefill_write_then_decode(use_flash_attn: bool) -> None:
    """The backend's unrotated write, then ALiBi prefill (flash-attn's alibi_slopes or the
    Triton kernel) and decode from the written cache."""
    if use_flash_attn:
        pytest.importorskip("flash_attn")
    backend = TritonAttentionBackend(DEVICE, use_flash_attn=use_flash_attn)
    case = PrefillThenDecode.build(num_heads=16, num_kv_heads=16, head_dim=64)
    slopes = _slopes(16)
    expected = _prefill_reference(case.q, case.k, case.v, case.cu, case.scale, 0, slopes)
    case.check(backend, backend, expected, alibi_slopes=slopes)


@KV_LAYOUTS
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(1, 64), (3, 80), (8, 128)])
def test_write_kv_cache_unrotated_equals_torch(
    num_kv_heads: int, head_dim: int, keys_major: bool
) -> None:
    """Bit for bit the torch backend's scatter (negative slots skipped); k and v untouched."""
    dtype, num_tokens, page_size, num_pages = DTYPES[0], 37, 16, 5
    k = _random((num_tokens, num_kv_heads, head_dim), dtype)
    v = _random((num_tokens, num_kv_heads, head_dim), dtype)
    slots = torch.randperm(num_pages * page_size, device=DEVICE)[:num_tokens]
    slots[::5] = -1
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, 7.0, dtype=dtype, device=DEVICE)
    v_cache = allocate_pool(shape, dtype=dtype, device=DEVICE, keys_major=keys_major).fill_(7.0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    TorchNativeBackend().write_kv(k, v, k_ref, v_ref, slots)
    k_before, v_before = k.clone(), v.clone()
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)
