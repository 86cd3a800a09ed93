"""On a CUDA device: prefix caching through the Triton prefill-with-prefix kernels and the CUDA
graphs of decode gives the same float32 greedy tokens as caching off (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardline.proto import generate_pb2 as pb
from shardline.shard_config import ShardConfig
from shardline.shards.bootstrap import create_engine
from tests.model_factory import TinyModelSpec, build_tiny_model
from tests.shard_harness import Arrival, make_request, random_prompts, run_schedule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    spec = TinyModelSpec(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2)
    return build_tiny_model(tmp_path_factory.mktemp("gpu-prefix"), spec)


def _tokens(
    model_dir: Path, caching: bool, prompts: list[list[int]], chunk: int
) -> tuple[list[list[list[int]]], int]:
    engine = create_engine(
        ShardConfig(
            model=str(model_dir),
            dtype="float32",
            attention="triton",
            block_size=16,
            gpu_memory_utilization=0.5,
            enable_prefix_caching=caching,
        )
    )
    engine.warmup(pb.WarmupRequest(max_prefill_tokens=2048, max_input_tokens=1024))
    rounds = []
    for _ in range(2):  # the second round finds every prompt cached
        arrivals = [Arrival(i % 3, make_request(i, p, 24)) for i, p in enumerate(prompts)]
        result = run_schedule(engine.prefill, engine.decode, arrivals, True, True, chunk)
        rounds.append([result.tokens[i] for i in range(len(prompts))])
    hits = engine.allocator.counters.hit_tokens if caching else 0
    engine.clear_cache(pb.ClearCacheRequest())
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks and stats.cached_blocks == 0
    return rounds, hits


@pytest.mark.parametrize("chunk", [0, 48])
def test_cached_prefixes_give_the_tokens_of_caching_off(model_dir, chunk):
    common = random_prompts(1, 384, seed=61, min_len=300, max_len=300)[0]
    prompts = [common + tail for tail in random_prompts(8, 384, seed=62, max_len=90)]
    cached, hits = _tokens(model_dir, True, prompts, chunk)
    cold, _ = _tokens(model_dir, False, prompts, chunk)
    assert cached == cold
    assert hits >= len(prompts) * 288
