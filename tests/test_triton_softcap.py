"""Attention logit soft-capping (Gemma 2) in the Triton kernels (paged decode, varlen prefill with
and without a cached prefix and window, the backend's prefill-then-decode) and the torch backend,
against the float64 reference (tests/triton_attention_helpers.py).

Runs on CUDA; skipped elsewhere unless TRITON_INTERPRET=1 is set (Triton's CPU interpreter)."""

from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, INTERPRET  # isort: skip (skips first)

from shardline.shards.layers.attention.decode_plan import DecodeConfig, SplitPlan
from shardline.shards.layers.attention.torch_native import TorchNativeBackend
from shardline.shards.layers.attention.triton_decode import paged_decode_attention
from shardline.shards.layers.attention.triton_paged import TritonAttentionBackend
from shardline.shards.layers.attention.triton_prefill import PrefillConfig, varlen_causal_attention
from tests.test_triton_prefill import CHUNKED, PREFILL_LENGTHS, _chunked_case
from tests.triton_attention_helpers import (
    DTYPES,
    KV_LAYOUTS,
    LONG,
    PagedCase,
    PrefillThenDecode,
    _assert_close_rows,
    _attention_reference,
    _packed_prefill,
    _poison_allocator,
    cached_prefix_meta,
)

CAP = 1.5  # below most scaled scores of these random cases, so the cap changes the result
CONTEXTS = [0, 1, 15, 17, 64, 257, LONG]


def _decode_reference(case: PagedCase, softcap: float) -> torch.Tensor:
    rows = [
        _attention_reference(q[None], k, v, case.scale, causal=False, softcap=softcap)[0]
        for q, k, v in zip(case.q, case.keys, case.values, strict=True)
    ]
    return torch.stack(rows)


def _prefill_reference(q, k, v, cu, scale: float, window: int, softcap: float) -> torch.Tensor:
    bounds = cu.tolist()
    return torch.cat([
        _attention_reference(q[a:b], k[a:b], v[a:b], scale, True, window, softcap=softcap)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ])  # fmt: skip


@KV_LAYOUTS
@pytest.mark.parametrize("head_dim", [64, 256])  # 256: Gemma's
@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("splits", ["auto", 1, 5])
@pytest.mark.parametrize("dtype", [DTYPES[0], torch.float32])
def test_decode_softcap(
    dtype: torch.dtype, splits, window: int, head_dim: int, keys_major: bool
) -> None:
    case = PagedCase(CONTEXTS, 8, 2, head_dim, dtype, keys_major=keys_major)
    if window:
        case.slide(window)
    plan = None if splits == "auto" else SplitPlan(int(splits))
    _poison_allocator()
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale,
        DecodeConfig(), plan, window=window, softcap=CAP,
    )  # fmt: skip
    expected = _decode_reference(case, CAP)
    _assert_close_rows(out, expected, dtype)
    assert not torch.allclose(expected, _decode_reference(case, 0.0))


@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", [DTYPES[0], torch.float32])
def test_prefill_softcap(dtype: torch.dtype, window: int, head_dim: int) -> None:
    q, k, v, cu = _packed_prefill(PREFILL_LENGTHS, 8, 2, head_dim, dtype)
    _poison_allocator()
    out = varlen_causal_attention(
        q, k, v, cu, max(PREFILL_LENGTHS), 0.125, window=window, softcap=CAP
    )
    _assert_close_rows(out, _prefill_reference(q, k, v, cu, 0.125, window, CAP), dtype)


def _chunked_reference(sequences, window: int) -> torch.Tensor:
    return torch.cat([
        _attention_reference(q[p:], k, v, 0.125, True, window, softcap=CAP)
        for (p, _), (q, k, v) in zip(CHUNKED, sequences, strict=True)
    ])  # fmt: skip


@KV_LAYOUTS
@pytest.mark.parametrize("window", [0, 5])
def test_prefill_softcap_continues_a_cached_prefix(window: int, keys_major: bool) -> None:
    dtype = DTYPES[0]
    sequences, (q, k, v, cu), cached = _chunked_case(dtype, keys_major=keys_major)
    _poison_allocator()
    max_chunk = max(n for _, n in CHUNKED)
    out = varlen_causal_attention(
        q, k, v, cu, max_chunk, 0.125, PrefillConfig(block_n=16), window, cached, softcap=CAP
    )
    _assert_close_rows(out, _chunked_reference(sequences, window), dtype)


@pytest.mark.parametrize("window", [0, 5])
def test_torch_backend_softcap_continues_a_cached_prefix(window: int) -> None:
    """The CPU backend's soft-capping against the same reference as the kernels."""
    dtype = DTYPES[0]
    sequences, (q, k, v, cu), cached = _chunked_case(dtype)
    meta = cached_prefix_meta(q.shape[0], cu, cached)
    out = TorchNativeBackend().prefill(
        q, k, v, cached.k_cache, cached.v_cache, meta, 0.125, window, softcap=CAP
    )
    _assert_close_rows(out, _chunked_reference(sequences, window), dtype)


@pytest.mark.skipif(INTERPRET, reason="the backend needs a CUDA device")
@pytest.mark.parametrize("use_flash_attn", [False, True])
def test_backend_softcap_prefill_write_then_decode(use_flash_attn: bool) -> None:
    """The backend's rotate-free write, soft-capped prefill (the Triton kernel even where
    flash-attn is on) and decode from the written cache."""
    if use_flash_attn:
        pytest.importorskip("flash_attn")
    backend = TritonAttentionBackend(DEVICE, use_flash_attn=use_flash_attn)
    case = PrefillThenDecode.build(num_heads=16, num_kv_heads=8, head_dim=64)
    expected = _prefill_reference(case.q, case.k, case.v, case.cu, case.scale, 0, CAP)
    case.check(backend, backend, expected, softcap=CAP)
