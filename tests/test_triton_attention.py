"""Triton attention kernels against a float64 torch reference on random inputs.

Runs on CUDA; skipped elsewhere unless TRITON_INTERPRET=1 is set, which runs the same kernels
through Triton's CPU interpreter on smaller problems (a developer aid, slow). Unused cache slots,
unused block-table entries and the allocator's free memory are filled with NaN, so a kernel that
reads outside a sequence's context or leaves an output element unwritten fails the check.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.triton_device import DEVICE, INTERPRET  # isort: skip (skips first)

from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.layers.attention.torch_native import TorchNativeBackend
from shardline.shards.layers.attention.triton_decode import (
    DecodeConfig,
    SplitPlan,
    paged_decode_attention,
    plan_splits,
)
from shardline.shards.layers.attention.triton_kv_write import (
    _rotate_write_kv_kernel,
    rotate_and_write_kv_cache,
)
from shardline.shards.layers.attention.triton_paged import TritonAttentionBackend
from shardline.shards.layers.attention.triton_prefill import (
    CachedPrefix,
    PrefillConfig,
    varlen_causal_attention,
)
from shardline.shards.layers.rotary import RotaryEmbedding
from shardline.shards.layers.triton_rotary import rotate_in_place

LONG = 300 if INTERPRET else 8192
TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}
DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
HEAD_SHAPES = [(4, 4), (8, 2), (16, 2)]  # (query heads, KV heads): GQA ratios 1, 4, 8
# The CPU interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest.
ROTARY_DTYPES = (
    [torch.float16, torch.float32] if INTERPRET else [torch.float16, torch.float32, torch.bfloat16]
)


def _poison_allocator() -> None:
    """Leaves NaN in the caching allocator's free blocks, so unwritten outputs show up."""
    if DEVICE.type == "cuda":
        filler = torch.full((64 << 20,), float("nan"), device=DEVICE)
        del filler


def _random(shape: tuple[int, ...], dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=DEVICE) * std).to(dtype)


class PagedCase:
    """Random sequences stored at shuffled pages of a NaN-filled paged cache."""

    def __init__(
        self,
        context_lens: list[int],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        page_size: int = 16,
    ) -> None:
        pages_per_seq = [math.ceil(n / page_size) for n in context_lens]
        width = max(pages_per_seq) + 2
        num_pages = sum(pages_per_seq) + 1  # the last page is a NaN page the tables pad with
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
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
            self.k_cache.view(-1, num_kv_heads, head_dim)[slots] = keys
            self.v_cache.view(-1, num_kv_heads, head_dim)[slots] = values
            self.keys.append(keys)
            self.values.append(values)
            self.slots.append(slots)
        self.block_tables = self.block_tables.to(DEVICE)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
        self.q = _random((len(context_lens), num_heads, head_dim), dtype, std=2.0)
        self.scale = head_dim**-0.5

    def slide(self, window: int) -> None:
        """Keeps each row's last `window` keys; the older ones become NaN in the cache, so a
        kernel that reads them fails the check."""
        for row, slots in enumerate(self.slots):
            old = slots[: max(0, len(slots) - window)]
            self.k_cache.view(-1, *self.k_cache.shape[2:])[old] = float("nan")
            self.v_cache.view(-1, *self.v_cache.shape[2:])[old] = float("nan")
            self.keys[row] = self.keys[row][len(old) :]
            self.values[row] = self.values[row][len(old) :]

    def reference(self) -> torch.Tensor:
        rows = [
            _attention_reference(q[None], k, v, self.scale, causal=False)[0]
            for q, k, v in zip(self.q, self.keys, self.values, strict=True)
        ]
        return torch.stack(rows)


def _attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, window: int = 0
) -> torch.Tensor:
    """Float64 softmax attention; q [m, heads, d], k/v [n, kv_heads, d]. Zeros where n == 0.
    Causal with window > 0: each query sees itself and the window - 1 keys before it."""
    group = q.shape[1] // k.shape[1]
    if k.shape[0] == 0:
        return torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.double(), k64) * scale
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


MIXED_CONTEXTS = [0, 1, 15, 16, 17, 31, 32, 33, 64, 100, 257, 1000, LONG]


@pytest.mark.parametrize("splits", ["auto", 1, 5, 64])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_SHAPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(
    dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int, splits: str | int
) -> None:
    case = PagedCase(MIXED_CONTEXTS, num_heads, num_kv_heads, head_dim, dtype)
    config = DecodeConfig()
    plan = None if splits == "auto" else SplitPlan(int(splits))
    _poison_allocator()
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale,
        config, plan,
    )  # fmt: skip
    _assert_close_rows(out, case.reference(), dtype)


@pytest.mark.parametrize("page_size", [1, 16, 48])
@pytest.mark.parametrize("block_n", [16, 64])
def test_decode_page_sizes(page_size: int, block_n: int) -> None:
    case = PagedCase([1, 47, 48, 49, 200, 0], 8, 2, 64, torch.float16, page_size=page_size)
    _poison_allocator()
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale,
        DecodeConfig(block_n=block_n), SplitPlan(3),
    )  # fmt: skip
    _assert_close_rows(out, case.reference(), torch.float16)


@pytest.mark.parametrize("splits", ["auto", "planned for 132 SMs", 1, 5])
@pytest.mark.parametrize("window", [1, 16, 37])
def test_decode_sliding_window_reads_only_the_window(window: int, splits: str | int) -> None:
    case = PagedCase(MIXED_CONTEXTS, 8, 2, 64, DTYPES[0])
    case.slide(window)
    config = DecodeConfig(block_n=16)
    max_tokens = case.block_tables.shape[1] * case.k_cache.shape[1]
    plans = {
        "auto": None,
        "planned for 132 SMs": plan_splits(len(MIXED_CONTEXTS), 2, max_tokens, 16, 132, window),
    }
    plan = plans[splits] if splits in plans else SplitPlan(int(splits))
    _poison_allocator()
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale,
        config, plan, window=window,
    )  # fmt: skip
    _assert_close_rows(out, case.reference(), DTYPES[0])


def test_decode_long_contexts_small_batch() -> None:
    case = PagedCase([LONG, LONG - 7, 3], 32, 8, 128, DTYPES[0])
    _poison_allocator()
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale
    )
    _assert_close_rows(out, case.reference(), DTYPES[0])


def test_float32_decode_is_not_tf32() -> None:
    case = PagedCase([1, 33, 500, 0], 8, 2, 128, torch.float32)
    _poison_allocator()
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale
    )
    _assert_close_rows(out, case.reference(), torch.float32)


def test_decode_non_contiguous_query() -> None:
    case = PagedCase([5, 40, 300], 8, 2, 64, torch.float16)
    qkv = _random((3, 8 + 2 * 2, 64), torch.float16, std=2.0)
    case.q = qkv[:, :8]
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale
    )
    _assert_close_rows(out, case.reference(), torch.float16)


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_decode_replays_in_cuda_graph() -> None:
    dtype = torch.bfloat16
    captured = PagedCase([1, 2, 3, 0], 32, 8, 128, dtype)
    fresh = PagedCase([700, 0, 1, 129], 32, 8, 128, dtype)
    width = max(captured.block_tables.shape[1], fresh.block_tables.shape[1])
    tables = torch.zeros((4, width), dtype=torch.int32, device=DEVICE)
    tables[:, : captured.block_tables.shape[1]] = captured.block_tables
    k_cache, v_cache = fresh.k_cache, fresh.v_cache
    q, lens = captured.q.clone(), captured.context_lens.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, fresh.scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, fresh.scale)
    q.copy_(fresh.q)
    lens.copy_(fresh.context_lens)
    tables.zero_()
    tables[:, : fresh.block_tables.shape[1]] = fresh.block_tables
    out.fill_(float("nan"))
    graph.replay()
    _assert_close_rows(out, fresh.reference(), dtype)


class RotateWriteCase:
    """A fused qkv output, each token's position and cache slot (every fifth one -1, so skipped),
    and the rotary tables of a model with 512 positions; caches filled with 7."""

    def __init__(
        self, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        page_size, num_pages = 16, num_tokens // 16 + 3
        self.split_sizes = [num_heads, num_kv_heads, num_kv_heads]
        self.qkv = _random((num_tokens, sum(self.split_sizes), head_dim), dtype, std=2.0)
        self.rotary = RotaryEmbedding(head_dim, 512, 10000.0, None, dtype, DEVICE)
        self.positions = torch.randint(0, 512, (num_tokens,), device=DEVICE)
        self.positions[:2] = torch.tensor([0, 511])[:num_tokens]  # the table's first and last
        self.slots = torch.randperm(num_pages * page_size, device=DEVICE)[:num_tokens]
        self.slots[::5] = -1
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k_cache = torch.full(shape, 7.0, dtype=dtype, device=DEVICE)
        self.v_cache = torch.full(shape, 7.0, dtype=dtype, device=DEVICE)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return qkv.split(self.split_sizes, dim=1)

    def run_fused(self) -> None:
        q, k, v = self.split(self.qkv)
        cos, sin = self.rotary.cos, self.rotary.sin
        rotate_and_write_kv_cache(
            q, k, v, self.positions, cos, sin, self.k_cache, self.v_cache, self.slots
        )

    def expected(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv and both caches after rotate_in_place of q and k, then the torch backend's
        scatter of k and v by slot."""
        qkv, k_cache, v_cache = self.qkv.clone(), self.k_cache.clone(), self.v_cache.clone()
        rotated = self.split_sizes[0] + self.split_sizes[1]
        rotate_in_place(qkv[:, :rotated], self.positions, self.rotary.cos, self.rotary.sin)
        _, k, v = self.split(qkv)
        TorchNativeBackend().write_kv(k, v, k_cache, v_cache, self.slots)
        return qkv, k_cache, v_cache

    def assert_matches(self, expected: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Bit for bit: q and k rotated in place (v untouched), both caches."""
        for out, ref in zip((self.qkv, self.k_cache, self.v_cache), expected, strict=True):
            assert torch.equal(out, ref)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [*HEAD_SHAPES, (12, 3)])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", ROTARY_DTYPES)
def test_rotate_and_write_kv_equals_rotary_then_write(
    dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int
) -> None:
    case = RotateWriteCase(37, num_heads, num_kv_heads, head_dim, dtype)
    expected = case.expected()
    case.run_fused()
    case.assert_matches(expected)


def test_rotate_and_write_kv_with_no_tokens_is_a_no_op() -> None:
    case = RotateWriteCase(0, 8, 2, 64, torch.float16)
    # no rows of a buffer whose rows a kernel launched anyway would rotate and write
    storage = _random((4, *case.qkv.shape[1:]), torch.float16, std=2.0)
    before, case.qkv = storage.clone(), storage[:0]
    case.run_fused()
    assert torch.equal(storage, before)
    assert bool((case.k_cache == 7).all()) and bool((case.v_cache == 7).all())


def _compiled_variants(kernel: object) -> int:
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


@pytest.mark.skipif(INTERPRET, reason="counts compiled GPU kernels")
def test_rotate_and_write_kv_compiles_once_for_any_token_count() -> None:
    RotateWriteCase(1, 8, 2, 128, torch.bfloat16).run_fused()
    compiled = _compiled_variants(_rotate_write_kv_kernel)
    for num_tokens in (2, 16, 37, 1000):
        RotateWriteCase(num_tokens, 8, 2, 128, torch.bfloat16).run_fused()
    assert _compiled_variants(_rotate_write_kv_kernel) == compiled


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_rotate_and_write_kv_replays_in_cuda_graph() -> None:
    case = RotateWriteCase(37, 16, 2, 128, torch.bfloat16)
    fresh = RotateWriteCase(37, 16, 2, 128, torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        case.run_fused()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        case.run_fused()
    expected = fresh.expected()
    for name in ("qkv", "positions", "slots", "k_cache", "v_cache"):
        getattr(case, name).copy_(getattr(fresh, name))
    graph.replay()
    case.assert_matches(expected)


@pytest.mark.skipif(INTERPRET, reason="the backend needs a CUDA device")
def test_backend_rotate_and_write_kv_matches_torch_backend() -> None:
    """The fused Triton call against the torch backend's rotary.rotate_ then write_kv."""
    fused = RotateWriteCase(37, 16, 4, 128, torch.bfloat16)
    reference = RotateWriteCase(37, 16, 4, 128, torch.bfloat16)
    for name in ("qkv", "positions", "slots"):
        getattr(reference, name).copy_(getattr(fused, name))
    for backend, case in (
        (TritonAttentionBackend(DEVICE), fused),
        (TorchNativeBackend(), reference),
    ):
        q, k, v = case.split(case.qkv)
        backend.rotate_and_write_kv(
            q, k, v, case.positions, case.rotary, case.k_cache, case.v_cache, case.slots
        )
    fused.assert_matches((reference.qkv, reference.k_cache, reference.v_cache))


def _packed_prefill(
    lengths: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    total = sum(lengths)
    q = _random((total, num_heads, head_dim), dtype, std=2.0)
    k = _random((total, num_kv_heads, head_dim), dtype)
    v = _random((total, num_kv_heads, head_dim), dtype)
    cu = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
    return q, k, v, cu


def _prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    bounds = cu.tolist()
    parts = [
        _attention_reference(q[a:b], k[a:b], v[a:b], scale, causal=True, window=window)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(parts)


PREFILL_LENGTHS = [1, 7, 16, 64, 129, 300] if INTERPRET else [1, 7, 16, 64, 129, 300, 1000, 2500]


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_SHAPES)
@pytest.mark.parametrize("head_dim", [64, 128])
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
    lengths, num_heads, num_kv_heads, head_dim, page_size = [5, 33, 16], 16, 4, 128, 16
    dtype = torch.bfloat16
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
    TorchNativeBackend().write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    scale = head_dim**-0.5
    expected = _prefill_reference(q, k, v, cu, scale, window)
    _assert_close_rows(
        backend.prefill(q, k, v, k_cache, v_cache, meta, scale, window), expected, dtype
    )
    last = cu[1:] - 1
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    decode_meta = AttentionMetadata(False, slots[last], block_tables=tables, context_lens=lens)
    out = backend.decode(q[last], k_cache, v_cache, decode_meta, scale, window)
    _assert_close_rows(out, expected[last], dtype)


# (cached prefix, chunk) lengths of a chunked prefill's sequences.
CHUNKED = [(0, 5), (16, 33), (40, 1), (100, 64), (7, 130), (LONG, 70)]


def _chunked_case(dtype: torch.dtype, page_size: int = 16):
    """Whole sequences q/k/v, the chunks' packed q/k/v, and a NaN-poisoned paged cache holding
    each sequence's prefix (pages shuffled)."""
    num_heads, num_kv_heads, head_dim = 8, 2, 64
    sequences = [
        _packed_prefill([p + n], num_heads, num_kv_heads, head_dim, dtype)[:3] for p, n in CHUNKED
    ]
    width = max(-(-(p + n) // page_size) for p, n in CHUNKED)
    pages = torch.randperm(len(CHUNKED) * width, device=DEVICE).to(torch.int32)
    tables = pages.view(len(CHUNKED), width)
    shape = (len(CHUNKED) * width, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
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


def _chunked_reference(sequences, scale: float, window: int) -> torch.Tensor:
    return torch.cat([
        _attention_reference(q[p:], k, v, scale, causal=True, window=window)
        for (p, _), (q, k, v) in zip(CHUNKED, sequences, strict=True)
    ])  # fmt: skip


@pytest.mark.parametrize("block_n", [16, 64])
@pytest.mark.parametrize("window", [0, 5, 64])
def test_prefill_continues_a_cached_prefix(window: int, block_n: int) -> None:
    dtype = DTYPES[0]
    sequences, (q, k, v, cu), cached = _chunked_case(dtype)
    config = PrefillConfig(block_m=64, block_n=block_n)
    _poison_allocator()
    max_chunk = max(n for _, n in CHUNKED)
    out = varlen_causal_attention(q, k, v, cu, max_chunk, 0.125, config, window, prefix=cached)
    _assert_close_rows(out, _chunked_reference(sequences, 0.125, window), dtype)


@pytest.mark.parametrize("window", [0, 5])
def test_torch_backend_continues_a_cached_prefix(window: int) -> None:
    """The CPU backend's chunked prefill against the same reference as the Triton kernel."""
    dtype = DTYPES[0]
    sequences, (q, k, v, cu), cached = _chunked_case(dtype)
    meta = AttentionMetadata(
        True,
        torch.full((q.shape[0],), -1, device=DEVICE),
        cu_seqlens=cu,
        prefix_lens=cached.prefix_lens,
        prefix_block_tables=cached.block_tables,
    )
    out = TorchNativeBackend().prefill(q, k, v, cached.k_cache, cached.v_cache, meta, 0.125, window)
    _assert_close_rows(out, _chunked_reference(sequences, 0.125, window), dtype)
