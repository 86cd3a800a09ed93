"""Real shard processes over real unix sockets, through the generated gRPC client."""

from __future__ import annotations

import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from shardline.proto import generate_pb2 as pb
from shardline.proto import generate_pb2_grpc
from tests.shard_harness import (
    Arrival,
    make_request,
    random_prompts,
    run_schedule,
    start_shards,
    stop_shards,
    transformers_greedy,
    wait_for_sockets,
)


class LockstepShards:
    """Sends every call to all shards at once and answers shard 0's reply, as the router does."""

    def __init__(self, uds_prefix: str, world_size: int) -> None:
        self.channels = [
            grpc.insecure_channel(f"unix://{uds_prefix}-{r}") for r in range(world_size)
        ]
        self.stubs = [generate_pb2_grpc.TextGenerationServiceStub(c) for c in self.channels]
        self.pool = ThreadPoolExecutor(max_workers=world_size)

    def call(self, method: str, request):
        futures = [
            self.pool.submit(getattr(stub, method), request, timeout=120) for stub in self.stubs
        ]
        answers = [future.result() for future in futures]
        return answers[0]

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.pool.shutdown()


@pytest.fixture(scope="module")
def single_shard(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    prefix = str(tmp_path_factory.mktemp("sock") / "shard")
    processes = start_shards(tiny_llama_dir, prefix, 1)
    try:
        wait_for_sockets(prefix, 1, processes)
        shards = LockstepShards(prefix, 1)
        shards.call("Warmup", pb.WarmupRequest(max_prefill_tokens=256, max_input_tokens=128))
        yield prefix, shards
        shards.close()
    finally:
        stop_shards(processes)
    assert not Path(f"{prefix}-0").exists(), "the socket file outlived the shard"


def test_every_rpc_answers(single_shard):
    prefix, shards = single_shard
    assert stat.S_IMODE(Path(f"{prefix}-0").stat().st_mode) == 0o600
    shards.call("Health", pb.HealthRequest())
    info = shards.call("Info", pb.InfoRequest())
    assert info.device_type == "cpu" and info.block_size == 4 and info.model_type == "llama"
    urls = shards.call("ServiceDiscovery", pb.ServiceDiscoveryRequest()).urls
    assert list(urls) == [f"unix://{prefix}-0"]
    prompts = random_prompts(2, info.vocab_size, seed=11)
    requests = [make_request(i, p, 6) for i, p in enumerate(prompts)]
    answer = shards.call("Prefill", pb.PrefillRequest(batch=pb.Batch(id=1, requests=requests)))
    assert [g.request_id for g in answer.generations] == [0, 1]
    answer = shards.call("Decode", pb.DecodeRequest(batches=[answer.batch]))
    filtered = shards.call("FilterBatch", pb.FilterBatchRequest(batch_id=1, request_ids=[0]))
    assert list(filtered.batch.request_ids) == [0]
    shards.call("ClearCache", pb.ClearCacheRequest())
    stats = shards.call("Stats", pb.StatsRequest())
    assert stats.free_blocks == stats.total_blocks > 0


def test_errors_are_statuses_and_the_shard_lives_on(single_shard):
    _, shards = single_shard
    with pytest.raises(grpc.RpcError) as raised:
        shards.call("Prefill", pb.PrefillRequest(batch=pb.Batch(id=2)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no requests" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        shards.call("Decode", pb.DecodeRequest(batches=[pb.CachedBatch(id=12345)]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    shards.call("Health", pb.HealthRequest())


def test_tensor_parallel_shards_match_one_shard(tiny_llama_dir: Path, tmp_path: Path):
    """Two gloo ranks in two processes give transformers' greedy tokens, as one rank does, with
    whole prompts and with prompts prefilled 5 tokens a pass beside the running batch."""
    prompts = random_prompts(4, 384, seed=12)
    max_new = [8, 3, 12, 6]
    expected = transformers_greedy(tiny_llama_dir, prompts, max_new)
    prefix = str(tmp_path / "tp")
    processes = start_shards(tiny_llama_dir, prefix, 2)
    try:
        wait_for_sockets(prefix, 2, processes)
        shards = LockstepShards(prefix, 2)
        shards.call("Warmup", pb.WarmupRequest(max_prefill_tokens=128, max_input_tokens=64))
        arrivals = [
            Arrival(i, make_request(i, p, n)) for i, (p, n) in enumerate(zip(prompts, max_new))
        ]
        prefill, decode = (
            (lambda r: shards.call("Prefill", r)),
            (lambda r: shards.call("Decode", r)),
        )
        result = run_schedule(prefill, decode, arrivals)
        assert [result.tokens[i] for i in range(4)] == expected
        chunked = run_schedule(prefill, decode, arrivals, mixed=True, chunk=5)
        assert [chunked.tokens[i] for i in range(4)] == expected
        stats = shards.call("Stats", pb.StatsRequest())
        assert stats.free_blocks == stats.total_blocks
        shards.close()
    finally:
        stop_shards(processes)


def test_numbered_calls_run_in_number_order(single_shard):
    """A FilterBatch numbered after a Prefill waits for it, even when it arrives first."""
    from shardline.proto import CALL_SEQUENCE_KEY

    _, shards = single_shard
    stub = shards.stubs[0]
    prompts = random_prompts(2, 384, seed=13)
    prefill = pb.PrefillRequest(
        batch=pb.Batch(id=77, requests=[make_request(i, p, 8) for i, p in enumerate(prompts)])
    )
    keep_one = pb.FilterBatchRequest(batch_id=77, request_ids=[1])
    filtered = stub.FilterBatch.future(keep_one, metadata=((CALL_SEQUENCE_KEY, "1"),), timeout=30)
    time.sleep(0.3)
    stub.Prefill(prefill, metadata=((CALL_SEQUENCE_KEY, "0"),), timeout=30)
    assert list(filtered.result().batch.request_ids) == [1]
    shards.call("ClearCache", pb.ClearCacheRequest())
