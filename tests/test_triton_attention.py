"""Triton paged decode attention and the fused rotary + KV-cache write against a float64 torch
reference on random inputs (the prefill kernel: test_triton_prefill.py).

Runs on CUDA; skipped elsewhere unless TRITON_INTERPRET=1 is set, which runs the same kernels
through Triton's CPU interpreter on smaller problems (a developer aid, slow). Unused cache slots,
unused block-table entries and the allocator's free memory are filled with NaN (a keys-major V
with a finite stale value: triton_attention_helpers.STALE_VALUE), so a kernel that reads outside
a sequence's context or leaves an output element unwritten fails the check."""

from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, INTERPRET  # isort: skip (skips first)

from shardline.shards.kv_cache import allocate_pool, is_keys_major, keys_major_values
from shardline.shards.layers.attention import merge_counters
from shardline.shards.layers.attention.decode_plan import (
    BalancedPlan,
    DecodeConfig,
    SplitPlan,
    plan_splits,
)
from shardline.shards.layers.attention.torch_native import TorchNativeBackend
from shardline.shards.layers.attention.triton_decode import paged_decode_attention
from shardline.shards.layers.attention.triton_kv_write import (
    _rotate_write_kv_kernel,
    rotate_and_write_kv_cache,
    write_kv_cache,
)
from shardline.shards.layers.attention.triton_paged import TritonAttentionBackend
from shardline.shards.layers.fp8 import ScaledProduct
from shardline.shards.layers.rotary import RotaryEmbedding
from shardline.shards.layers.triton_rotary import rotate_in_place
from tests.triton_attention_helpers import (
    DTYPES,
    HEAD_SHAPES,
    KV_LAYOUTS,
    LONG,
    PagedCase,
    _assert_close_rows,
    _poison_allocator,
    _random,
)

# The CPU interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest.
ROTARY_DTYPES = (
    [torch.float16, torch.float32] if INTERPRET else [torch.float16, torch.float32, torch.bfloat16]
)


MIXED_CONTEXTS = [0, 1, 15, 16, 17, 31, 32, 33, 64, 100, 257, 1000, LONG]


@KV_LAYOUTS
@pytest.mark.parametrize("splits", ["auto", 1, 5, 64])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_SHAPES)
@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(
    dtype: torch.dtype,
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    splits: str | int,
    keys_major: bool,
) -> None:
    case = PagedCase(
        MIXED_CONTEXTS, num_heads, num_kv_heads, head_dim, dtype, keys_major=keys_major
    )
    config = DecodeConfig()
    plan = None if splits == "auto" else SplitPlan(int(splits))
    _poison_allocator()
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale,
        config, plan,
    )  # fmt: skip
    _assert_close_rows(out, case.reference(), dtype)


@KV_LAYOUTS
@pytest.mark.parametrize("page_size", [1, 16, 48, 64, 128])
@pytest.mark.parametrize("block_n", [16, 64])
def test_decode_page_sizes(page_size: int, block_n: int, keys_major: bool) -> None:
    contexts = [1, 47, 48, 49, 200, 0]
    case = PagedCase(contexts, 8, 2, 64, torch.float16, page_size, keys_major)
    _poison_allocator()
    out = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale,
        DecodeConfig(block_n=block_n), SplitPlan(3),
    )  # fmt: skip
    _assert_close_rows(out, case.reference(), torch.float16)


@KV_LAYOUTS
@pytest.mark.parametrize("splits", ["auto", "planned for 132 SMs", 1, 5])
@pytest.mark.parametrize("window", [1, 16, 37])  # 1, 37: windows whose first keys start no page
def test_decode_sliding_window_reads_only_the_window(
    window: int, splits: str | int, keys_major: bool
) -> None:
    case = PagedCase(MIXED_CONTEXTS, 8, 2, 64, DTYPES[0], keys_major=keys_major)
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


def _free_page_zero(case: PagedCase) -> None:
    """Moves the keys page 0 holds to the tables' padding page (the last), which no row reads."""
    padding = case.k_cache.shape[0] - 1
    for cache in (case.k_cache, case.v_cache):
        cache[padding] = cache[0]
    case.block_tables[case.block_tables == 0] = padding


@pytest.mark.parametrize("plan", [SplitPlan(1), SplitPlan(3), BalancedPlan(7)], ids=str)
def test_keys_major_decode_ignores_nan_written_to_stale_slots(plan: SplitPlan | BalancedPlan):
    """NaN written past row 0's end in its page and into page 0 (where tiles past a row's pages
    read): a keys-major V, whose stale slots the kernels read at zero weight, stores it as 0, so
    no row's output changes."""
    case = PagedCase([5, 40, 300, 0], 8, 2, 64, torch.float16, keys_major=True)
    _free_page_zero(case)

    def decode() -> torch.Tensor:
        return paged_decode_attention(
            case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
            case.scale, DecodeConfig(), plan,
        )  # fmt: skip

    before = decode()
    page = int(case.block_tables[0, 0])
    stale = torch.cat([page * 16 + torch.arange(5, 16), torch.arange(16)]).to(DEVICE)
    nan = torch.full((len(stale), 2, 64), float("nan"), dtype=torch.float16, device=DEVICE)
    write_kv_cache(nan, nan, case.k_cache, case.v_cache, stale)
    assert not case.v_cache[0].any() and case.k_cache[0].isnan().all()
    assert torch.equal(decode(), before)


@pytest.mark.parametrize("plan", [SplitPlan(3), BalancedPlan(7)], ids=str)
def test_decode_reads_an_fp8_cache_laid_out_as_kv_cache_lays_it(plan: SplitPlan | BalancedPlan):
    """Its V keys-major, against the reference on the FP8-rounded keys and values (the
    interpreter takes FP8 tensors too)."""
    fp8 = torch.float8_e4m3fn
    case = PagedCase(MIXED_CONTEXTS, 8, 2, 64, DTYPES[0], keys_major=keys_major_values(fp8))
    case.keys = [k.to(fp8).to(k.dtype) for k in case.keys]
    case.values = [v.to(fp8).to(v.dtype) for v in case.values]
    k_cache, v_cache = case.k_cache.to(fp8), case.v_cache.to(fp8)
    assert is_keys_major(v_cache)
    out = paged_decode_attention(
        case.q, k_cache, v_cache, case.block_tables, case.context_lens, case.scale,
        DecodeConfig(block_n=128), plan,
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


@pytest.mark.parametrize("merged_by", ["the last split", "a second kernel"])
def test_splits_merge_either_way_and_leave_their_counters_zeroed(monkeypatch, merged_by: str):
    monkeypatch.setattr(merge_counters, "_COUNTERS", {})
    if merged_by == "a second kernel":
        monkeypatch.setattr(merge_counters, "COUNTERS", 0)  # no call fits the buffer
    case = PagedCase([0, 1, 33, 257, LONG], 8, 2, 64, torch.float16)
    for splits in (5, 2, 5):  # each call finds the counters the last one reset
        out = paged_decode_attention(
            case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale,
            DecodeConfig(), SplitPlan(splits),
        )  # fmt: skip
        _assert_close_rows(out, case.reference(), torch.float16)
    assert not merge_counters._COUNTERS[case.q.device].any()


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_split_decode_merges_right_on_every_replay() -> None:
    """The last split program of each (row, KV head) merges: a race between the partials'
    stores and its loads, or a counter left unreset, shows on some of many replays."""
    case = PagedCase([1, 700, 129, 2000, 0, 63], 32, 8, 128, torch.bfloat16)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    plan = SplitPlan(16)
    paged_decode_attention(*args, DecodeConfig(), plan)  # compiled and counters made outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(*args, DecodeConfig(), plan)
    expected = case.reference()
    for _ in range(200):
        out.fill_(float("nan"))
        graph.replay()
        _assert_close_rows(out, expected, torch.bfloat16)


class RotateWriteCase:
    """A fused qkv output, each token's position and cache slot (every fifth one -1, so skipped),
    and the rotary tables of a model with 512 positions; caches filled with 7, V keys-major or
    not."""

    def __init__(
        self,
        num_tokens: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        keys_major: bool = False,
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
        self.v_cache = allocate_pool(shape, dtype=dtype, device=DEVICE, keys_major=keys_major)
        self.v_cache.fill_(7.0)

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


@KV_LAYOUTS
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [*HEAD_SHAPES, (12, 3)])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", ROTARY_DTYPES)
def test_rotate_and_write_kv_equals_rotary_then_write(
    dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int, keys_major: bool
) -> None:
    case = RotateWriteCase(37, num_heads, num_kv_heads, head_dim, dtype, keys_major)
    expected = case.expected()
    case.run_fused()
    case.assert_matches(expected)


@pytest.mark.parametrize("rotate", [True, False], ids=["rotate_and_write", "write"])
def test_kv_writes_store_nan_values_as_zero_in_a_keys_major_cache(rotate: bool) -> None:
    """What the torch backend writes, but a NaN value 0 (keys keep theirs)."""
    case = RotateWriteCase(37, 8, 2, 64, torch.float16, keys_major=True)
    case.qkv[::3, 8:, ::7] = float("nan")  # keys and values
    if rotate:
        _, k_cache, v_cache = case.expected()
        case.run_fused()
    else:
        _, k, v = case.split(case.qkv)
        k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
        TorchNativeBackend().write_kv(k, v, k_cache, v_cache, case.slots)
        write_kv_cache(k, v, case.k_cache, case.v_cache, case.slots)
    assert v_cache.isnan().any() and k_cache.isnan().any()
    assert torch.equal(case.v_cache, v_cache.nan_to_num(0.0))
    torch.testing.assert_close(case.k_cache, k_cache, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(8, 2), (12, 3)])
@pytest.mark.parametrize("dtype", ROTARY_DTYPES)
@pytest.mark.parametrize("keys_major", [False, True], ids=["contiguous", "keys_major"])
def test_rotate_and_write_kv_applies_an_fp8_qkv_products_scales(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, keys_major: bool
) -> None:
    """q, k and v as an FP8 qkv projection's unscaled product: rotated, written back and cached
    bit for bit as the product's value would be."""
    case = RotateWriteCase(37, num_heads, num_kv_heads, 128, dtype, keys_major)
    raw = case.qkv.view(37, -1) * 1e3
    product = ScaledProduct(
        raw, torch.rand(37, device=DEVICE), torch.rand(raw.shape[1], device=DEVICE) * 1e-3
    )
    case.qkv = product.value().view_as(case.qkv)
    expected = case.expected()
    case.qkv = raw.view_as(case.qkv)
    q, k, v = case.split(case.qkv)
    rotate_and_write_kv_cache(
        q, k, v, case.positions, case.rotary.cos, case.rotary.sin, case.k_cache, case.v_cache,
        case.slots, (product.row_scale, product.col_scale),
    )  # fmt: skip
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
