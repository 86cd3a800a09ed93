"""Shared by the Triton attention kernel tests: problem sizes and tolerances, random inputs, a
random paged KV-cache case in either layout of the V pool, NaN in the allocator's free memory
(so an unwritten output element shows up), and a float64 attention reference. A test module
imports tests.triton_device first: it skips the module off CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from tests.triton_device import DEVICE, INTERPRET  # isort: skip (skips first)

from shardline.shards.kv_cache import allocate_pool, is_keys_major
from shardline.shards.layers.attention.backend import AttentionBackend
from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.layers.attention.triton_prefill import CachedPrefix

LONG = 300 if INTERPRET else 8192
TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}
DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
HEAD_SHAPES = [(4, 4), (8, 2), (16, 2)]  # (query heads, KV heads): GQA ratios 1, 4, 8

# Both layouts of a V pool (kv_cache.allocate_pool), which the kernels take in any dtype: head_dim
# contiguous, and keys-major (KVCache's FP8 pools).
KV_LAYOUTS = pytest.mark.parametrize("keys_major", [False, True], ids=["contiguous", "keys_major"])
# What an unwritten slot holds, so that a kernel reading it at a nonzero weight fails: NaN, but
# a finite value far from the values' in a keys-major V, which kernels read at zero weight.
STALE_VALUE = 64.0  # exact in every cache dtype, FP8 included


def stale_value(cache: torch.Tensor) -> float:
    return STALE_VALUE if is_keys_major(cache) else float("nan")


def stale_pools(
    shape: tuple[int, int, int, int], dtype: torch.dtype, keys_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V pools [pages, page_size, kv_heads, dim] of unwritten slots, V keys-major or not."""
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = allocate_pool(shape, dtype=dtype, device=DEVICE, keys_major=keys_major)
    return k_cache, v_cache.fill_(stale_value(v_cache))


def write_slots(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor | float) -> None:
    """Puts `values` into the flat `slots` of a paged cache of either layout."""
    cache[slots // cache.shape[1], slots % cache.shape[1]] = values


def _poison_allocator() -> None:
    """Leaves NaN in the caching allocator's free blocks, so unwritten outputs show up."""
    if DEVICE.type == "cuda":
        filler = torch.full((64 << 20,), float("nan"), device=DEVICE)
        del filler


def _random(shape: tuple[int, ...], dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=DEVICE) * std).to(dtype)


def _packed_prefill(
    lengths: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    total = sum(lengths)
    q = _random((total, num_heads, head_dim), dtype, std=2.0)
    k = _random((total, num_kv_heads, head_dim), dtype)
    v = _random((total, num_kv_heads, head_dim), dtype)
    cu = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
    return q, k, v, cu


@dataclass
class PrefillThenDecode:
    """Three bfloat16 prompts (5, 33 and 16 tokens) packed for a prefill whose KV goes to their
    pages of a NaN-filled paged cache (pages of 16), then decoded from there."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    tables: torch.Tensor
    meta: AttentionMetadata
    lengths: list[int]
    scale: float
    dtype: torch.dtype = torch.bfloat16

    @classmethod
    def build(cls, num_heads: int, num_kv_heads: int, head_dim: int) -> PrefillThenDecode:
        lengths, page_size, dtype = [5, 33, 16], 16, torch.bfloat16
        q, k, v, cu = _packed_prefill(lengths, num_heads, num_kv_heads, head_dim, dtype)
        shape = (12, page_size, num_kv_heads, head_dim)
        k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        tables = torch.tensor([[3, 11, 0], [1, 4, 7], [9, 2, 5]], dtype=torch.int32, device=DEVICE)
        slots = torch.cat(
            [tables[i, torch.arange(n) // page_size] * page_size + torch.arange(n, device=DEVICE)
             % page_size for i, n in enumerate(lengths)]
        )  # fmt: skip
        meta = AttentionMetadata(True, slots, cu_seqlens=cu, max_seqlen=max(lengths))
        return cls(q, k, v, cu, k_cache, v_cache, tables, meta, lengths, head_dim**-0.5)

    def check(
        self,
        backend: AttentionBackend,
        writer: AttentionBackend,
        expected: torch.Tensor,
        **attention: object,
    ) -> None:
        """`writer` writes the prompts' K and V into the cache; `backend`'s prefill equals
        `expected`, and each prompt's last token decoded from the written cache equals its row;
        `attention`: the window, ALiBi slopes or soft-cap of both passes."""
        q, k, v, caches = self.q, self.k, self.v, (self.k_cache, self.v_cache)
        writer.write_kv(k, v, *caches, self.meta.slot_mapping)
        out = backend.prefill(q, k, v, *caches, self.meta, self.scale, **attention)
        _assert_close_rows(out, expected, self.dtype)
        last = self.cu[1:] - 1
        lens = torch.tensor(self.lengths, dtype=torch.int32, device=DEVICE)
        decode_meta = AttentionMetadata(
            False, self.meta.slot_mapping[last], block_tables=self.tables, context_lens=lens
        )
        out = backend.decode(q[last], *caches, decode_meta, self.scale, **attention)
        _assert_close_rows(out, expected[last], self.dtype)


def cached_prefix_meta(
    num_tokens: int, cu: torch.Tensor, cached: CachedPrefix
) -> AttentionMetadata:
    """A chunked prefill's metadata (nothing written) for the torch backend."""
    return AttentionMetadata(
        True,
        torch.full((num_tokens,), -1, device=DEVICE),
        cu_seqlens=cu,
        prefix_lens=cached.prefix_lens,
        prefix_block_tables=cached.block_tables,
    )


class PagedCase:
    """Random sequences stored at shuffled pages of a paged cache of stale slots (stale_pools),
    its V keys-major or not."""

    def __init__(
        self,
        context_lens: list[int],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        page_size: int = 16,
        keys_major: bool = False,
    ) -> None:
        pages_per_seq = [math.ceil(n / page_size) for n in context_lens]
        width = max(pages_per_seq) + 2
        num_pages = sum(pages_per_seq) + 1  # the last page is a stale page the tables pad with
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k_cache, self.v_cache = stale_pools(shape, dtype, keys_major)
        order = torch.randperm(num_pages - 1).tolist()
        self.block_tables = torch.full((len(context_lens), width), num_pages - 1, dtype=torch.int32)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots: list[torch.Tensor] = []
        for row, (length, count) in enumerate(zip(context_lens, pages_per_seq, strict=True)):
            pages, order = order[:count], order[count:]
            self.block_tables[row, :count] = torch.tensor(pages, dtype=torch.int32)
            keys = _random((length, num_kv_heads, head_dim), dtype)
            values = _random((length, num_kv_heads, head_dim), dtype)
            slots = (
                torch.tensor(pages, dtype=torch.long, device=DEVICE).repeat_interleave(page_size)
                * page_size
            )
            slots = (slots + torch.arange(count * page_size, device=DEVICE) % page_size)[:length]
            write_slots(self.k_cache, slots, keys)
            write_slots(self.v_cache, slots, values)
            self.keys.append(keys)
            self.values.append(values)
            self.slots.append(slots)
        self.block_tables = self.block_tables.to(DEVICE)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
        self.q = _random((len(context_lens), num_heads, head_dim), dtype, std=2.0)
        self.scale = head_dim**-0.5

    def slide(self, window: int) -> None:
        """Keeps each row's last `window` keys; the older ones become stale in the cache, so a
        kernel that reads them fails the check."""
        for row, slots in enumerate(self.slots):
            old = slots[: max(0, len(slots) - window)]
            write_slots(self.k_cache, old, float("nan"))
            write_slots(self.v_cache, old, stale_value(self.v_cache))
            self.keys[row] = self.keys[row][len(old) :]
            self.values[row] = self.values[row][len(old) :]

    def reference(self, slopes: torch.Tensor | None = None) -> torch.Tensor:
        rows = [
            _attention_reference(q[None], k, v, self.scale, causal=False, slopes=slopes)[0]
            for q, k, v in zip(self.q, self.keys, self.values, strict=True)
        ]
        return torch.stack(rows)


def _attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    window: int = 0,
    slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Float64 softmax attention; q [m, heads, d], k/v [n, kv_heads, d]. Zeros where n == 0.
    Causal with window > 0: each query sees itself and the window - 1 keys before it. With
    ALiBi `slopes` [heads], each score gains slope * (key position - query position), the
    queries being the last m positions. With `softcap`, the scaled scores are capped first
    (softcap * tanh(score / softcap))."""
    group = q.shape[1] // k.shape[1]
    if k.shape[0] == 0:
        return torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.double(), k64) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if slopes is not None:
        keys = torch.arange(k.shape[0], device=q.device)
        distance = keys[None, :] - keys[k.shape[0] - q.shape[0] :, None]
        scores = scores + slopes.double()[:, None, None] * distance.double()
    if causal:
        offset = k.shape[0] - q.shape[0]
        mask = torch.ones(scores.shape[1:], dtype=torch.bool, device=q.device).tril(offset)
        if window:
            mask = mask.triu(offset - window + 1)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hmn,nhd->mhd", scores.softmax(-1), v64)


def _assert_close_rows(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Per-row relative error under the dtype's tolerance; zero rows must be exactly zero."""
    assert torch.isfinite(out).all(), "non-finite output (unwritten or read outside context)"
    out64 = out.double().flatten(1)
    ref64 = ref.double().flatten(1)
    ref_norm = ref64.norm(dim=1)
    zero = ref_norm == 0
    assert (out64[zero] == 0).all()
    errors = (out64 - ref64).norm(dim=1)[~zero] / ref_norm[~zero]
    assert errors.max().item() < TOLERANCE[dtype], f"max relative row error {errors.max():.2e}"
