"""The decode rows' context lengths of benchmarks/attention_kernels.py --lengths mixed."""

import random
import statistics

import pytest

from benchmarks.decode_lengths import (
    ORDERS,
    describe,
    draw_lengths,
    log_uniform_lengths,
    workload_lengths,
)


def test_a_request_sits_in_the_batch_at_one_of_its_decode_steps():
    # (10, 1) never decodes; (100, 3) decodes twice, reading 101 then 102 keys.
    lengths = workload_lengths([(10, 1), (100, 3)], 400, 4096, random.Random(0))
    assert set(lengths) == {101, 102}
    assert 150 < lengths.count(101) < 250


def test_requests_are_drawn_by_the_steps_they_spend_in_the_batch():
    # 2 + 1 decode steps of the long-output request for each of the short one's: 3/4 of rows.
    pairs = [(1000, 2), (0, 4)]
    lengths = workload_lengths(pairs, 4000, 4096, random.Random(1))
    assert 0.72 < sum(n < 1000 for n in lengths) / len(lengths) < 0.78
    assert set(lengths) == {1001, 1, 2, 3}


def test_the_mean_row_matches_the_runs_kv_reads_per_decode_step():
    # Every decode step of a run: request (p, o) reads p + 1 ... p + o - 1 keys.
    rng = random.Random(2)
    pairs = [(rng.randint(5, 900), rng.randint(1, 600)) for _ in range(300)]
    steps = [p + k for p, o in pairs for k in range(1, o)]
    lengths = workload_lengths(pairs, 20_000, 4096, random.Random(3))
    assert statistics.mean(lengths) == pytest.approx(statistics.mean(steps), rel=0.03)


def test_lengths_are_capped_at_the_block_table():
    assert workload_lengths([(3000, 500)], 50, 2048, random.Random(0)) == [2048] * 50
    assert 2000 < max(log_uniform_lengths(1000, 2048, random.Random(0))) <= 2048


def test_a_workload_where_nothing_decodes_is_refused():
    with pytest.raises(ValueError, match="decodes"):
        workload_lengths([(10, 1)], 4, 4096, random.Random(0))


def test_log_uniform_spans_its_decades_evenly():
    lengths = log_uniform_lengths(6000, 3200, random.Random(4))
    assert min(lengths) >= 32 and max(lengths) <= 3200
    # [32, 320) and [320, 3200] are one decade each: about half the rows in each.
    assert 0.45 < sum(n < 320 for n in lengths) / len(lengths) < 0.55
    assert log_uniform_lengths(3, 16, random.Random(0)) == [16, 16, 16]


def test_draws_are_seeded_and_fall_back_to_log_uniform():
    pairs = [(50, 20), (700, 300)]
    assert draw_lengths(pairs, 64, 2048, 7) == draw_lengths(pairs, 64, 2048, 7)
    assert draw_lengths(pairs, 64, 2048, 7) != draw_lengths(pairs, 64, 2048, 8)
    assert draw_lengths(None, 64, 2048, 7) == log_uniform_lengths(64, 2048, random.Random(7))
    assert draw_lengths([], 8, 2048, 7) == log_uniform_lengths(8, 2048, random.Random(7))


def test_orders_keep_the_lengths():
    lengths = [5, 300, 40, 300, 2]
    assert ORDERS["random"](lengths) == lengths
    assert ORDERS["longest"](lengths) == [300, 300, 40, 5, 2]
    assert lengths == [5, 300, 40, 300, 2]


def test_describe():
    assert describe([10, 20, 90]) == "rows=3 keys mean 40 p50 20 max 90 total 120"
