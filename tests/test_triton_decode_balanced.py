"""The balanced paged decode kernel (tiles dealt out evenly over a fixed set of programs) against
a float64 reference: rows split over several programs and merged, rows written whole by one,
empty rows, windows, ALiBi, soft-capping, FP8-free dtypes; and a CUDA graph replay."""

from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, INTERPRET  # isort: skip (skips first)

from shardline.shards.layers.alibi import alibi_slopes
from shardline.shards.layers.attention import merge_counters
from shardline.shards.layers.attention.decode_plan import BalancedPlan, DecodeConfig
from shardline.shards.layers.attention.triton_decode_balanced import (
    balanced_decode_attention,
)
from tests.triton_attention_helpers import (
    DTYPES,
    HEAD_SHAPES,
    KV_LAYOUTS,
    LONG,
    PagedCase,
    _assert_close_rows,
    _attention_reference,
    _poison_allocator,
)

CONTEXTS = [0, 1, 15, 16, 17, 31, 33, 64, 100, 257, 0, 1000, LONG, 5]
# Programs per SM (the interpreter counts one SM): one program for everything, runs that cut
# rows in several places, more programs than tiles.
PROGRAMS = [1, 7, 64] if INTERPRET else [1, 4, 64]


def _decode(case: PagedCase, programs: int, config: DecodeConfig | None = None, **kw):
    _poison_allocator()
    return balanced_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale,
        config or DecodeConfig(), BalancedPlan(programs), **kw,
    )  # fmt: skip


@KV_LAYOUTS
@pytest.mark.parametrize("programs", PROGRAMS)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_SHAPES)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32])
def test_balanced_decode_matches_reference(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, programs: int, keys_major: bool
) -> None:
    case = PagedCase(CONTEXTS, num_heads, num_kv_heads, 64, dtype, keys_major=keys_major)
    _assert_close_rows(_decode(case, programs), case.reference(), dtype)


@KV_LAYOUTS
@pytest.mark.parametrize("block_n", [16, 64, 128])
@pytest.mark.parametrize("head_dim", [8, 128])
def test_balanced_decode_tiles_and_head_dims(block_n: int, head_dim: int, keys_major: bool):
    contexts = [1, 47, 48, 49, 200, 0, 130]
    case = PagedCase(contexts, 8, 2, head_dim, torch.float16, keys_major=keys_major)
    out = _decode(case, 7, DecodeConfig(block_n=block_n))
    _assert_close_rows(out, case.reference(), torch.float16)


@KV_LAYOUTS
@pytest.mark.parametrize("programs", PROGRAMS)
@pytest.mark.parametrize("window", [1, 16, 37])
def test_balanced_decode_window_reads_only_the_window(
    window: int, programs: int, keys_major: bool
) -> None:
    case = PagedCase(CONTEXTS, 8, 2, 64, DTYPES[0], keys_major=keys_major)
    case.slide(window)
    out = _decode(case, programs, DecodeConfig(block_n=16), window=window)
    _assert_close_rows(out, case.reference(), DTYPES[0])


@pytest.mark.parametrize("programs", PROGRAMS)
def test_balanced_decode_alibi(programs: int) -> None:
    case = PagedCase(CONTEXTS, 12, 3, 64, DTYPES[0])
    slopes = alibi_slopes(12).to(DEVICE)
    out = _decode(case, programs, alibi_slopes=slopes)
    _assert_close_rows(out, case.reference(slopes), DTYPES[0])


@pytest.mark.parametrize("programs", PROGRAMS)
def test_balanced_decode_softcap(programs: int) -> None:
    case = PagedCase(CONTEXTS, 8, 2, 64, torch.float32)
    case.q = case.q * 8  # scores past the cap
    out = _decode(case, programs, softcap=5.0)
    reference = torch.stack(
        [
            _attention_reference(q[None], k, v, case.scale, causal=False, softcap=5.0)[0]
            for q, k, v in zip(case.q, case.keys, case.values, strict=True)
        ]
    )
    _assert_close_rows(out, reference, torch.float32)


def test_balanced_decode_batch_one_long_context() -> None:
    case = PagedCase([LONG], 32, 8, 128, DTYPES[0])
    _assert_close_rows(_decode(case, 4), case.reference(), DTYPES[0])


@pytest.mark.parametrize("merged_by", ["the last program", "a second kernel"])
def test_balanced_parts_merge_either_way_and_leave_their_counters_zeroed(monkeypatch, merged_by):
    monkeypatch.setattr(merge_counters, "_COUNTERS", {})
    if merged_by == "a second kernel":
        monkeypatch.setattr(merge_counters, "COUNTERS", 0)  # no call fits the buffer
    case = PagedCase(CONTEXTS, 8, 2, 64, torch.float16)
    for programs in (7, 3, 7):  # each call finds the counters the last one reset
        _assert_close_rows(_decode(case, programs), case.reference(), torch.float16)
    assert not merge_counters._COUNTERS[case.q.device].any()


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_balanced_parts_merge_right_on_every_replay() -> None:
    """The last of a row's programs merges its parts: a race between the parts' stores and its
    loads, or a counter left unreset, shows on some of many replays."""
    case = PagedCase([1, 700, 129, 2000, 0, 63, *range(40, 2000, 37)], 32, 8, 128, torch.bfloat16)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    schedule = (DecodeConfig(num_stages=5), BalancedPlan(4))
    balanced_decode_attention(*args, *schedule)  # compiled and counters made outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = balanced_decode_attention(*args, *schedule)
    expected = case.reference()
    for _ in range(200):
        out.fill_(float("nan"))
        graph.replay()
        _assert_close_rows(out, expected, torch.bfloat16)


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_balanced_decode_replays_in_cuda_graph() -> None:
    case = PagedCase([3, 700, 40, 0, 129], 32, 8, 128, torch.bfloat16)
    lens = case.context_lens.clone()
    args = (case.q, case.k_cache, case.v_cache, case.block_tables)
    schedule = (DecodeConfig(num_stages=5), BalancedPlan(2))
    balanced_decode_attention(*args, lens, case.scale, *schedule)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = balanced_decode_attention(*args, lens, case.scale, *schedule)
    for shorter in ([3, 700, 40, 0, 129], [1, 650, 16, 0, 2]):  # within each row's pages
        lens.copy_(torch.tensor(shorter, dtype=torch.int32))
        graph.replay()
        expected = balanced_decode_attention(*args, lens, case.scale, *schedule)
        torch.testing.assert_close(out, expected)
