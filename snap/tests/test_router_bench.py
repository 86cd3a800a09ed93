"""The router benchmark runs end to end (the GPU runs use it to measure the host's CPU)."""

from benchmarks.router_bench import bench
from tests.shard_harness import free_port


def test_router_bench_streams_every_token():
    (result,) = bench(streams=8, new_tokens=16, rounds=1, port=free_port(), step_ms=1.0)
    assert result["errors"] == 0
    assert result["output_tok_s"] > 0
    assert 0 < result["router_cpu_us_per_token"] < 1e6
