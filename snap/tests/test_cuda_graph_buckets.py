"""Which decode batch sizes get a CUDA graph: TGI's --cuda-graphs list, capped by the router's
largest batch."""

from __future__ import annotations

import pytest

from shardline.shards.cuda_graphs import DEFAULT_BUCKETS, buckets_up_to, parse_buckets


def test_parse_buckets_reads_tgi_flag() -> None:
    assert parse_buckets(None) == DEFAULT_BUCKETS
    assert parse_buckets("1,2,4, 8") == (1, 2, 4, 8)
    assert parse_buckets("0") == ()
    with pytest.raises(ValueError):
        parse_buckets("4,-1")


@pytest.mark.parametrize(
    ("max_batch_size", "expected"),
    [
        (None, (1, 4, 16, 64)),
        (64, (1, 4, 16, 64)),
        (100, (1, 4, 16, 64)),
        (16, (1, 4, 16)),
        (10, (1, 4, 10)),
        (1, (1,)),
    ],
)
def test_buckets_stop_at_the_largest_batch(max_batch_size: int | None, expected) -> None:
    assert buckets_up_to((1, 4, 16, 64), max_batch_size) == expected


def test_no_buckets_stay_none() -> None:
    assert buckets_up_to((), 32) == ()
