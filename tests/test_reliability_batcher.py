"""The batcher's token budgets under a random mix of lengths: the shards are never handed more
KV tokens (rounded up to whole blocks) or prefill tokens than the budgets allow."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest

from shardline.proto import generate_pb2 as pb
from shardline.router.batcher import Batcher, BatchingConfig
from shardline.router.client import StepResult
from shardline.router.request_types import ValidRequest
from shardline.sampling_params import SamplingParams
from tests.fake_shard import FakeShardClient, tiny_tokenizer

TOTAL_BUDGET = 192
PREFILL_BUDGET = 48


def _script(prompt: list[int]) -> list[int]:
    return [(prompt[-1] + step) % 190 + 10 for step in range(400)]


class BudgetCheckingShard(FakeShardClient):
    """Records the KV tokens held, whole blocks, after every prefill is admitted."""

    def __init__(self, eos_id: int, block_size: int) -> None:
        super().__init__(_script, eos_id, block_size=block_size)
        self.held: list[int] = []
        self.prefill_sizes: list[int] = []

    def _reserved(self, request: pb.Request) -> int:
        total = len(request.input_ids) + request.stopping_parameters.max_new_tokens
        return -(-total // self.block_size) * self.block_size

    async def prefill(
        self,
        batch: pb.Batch,
        cached_batches: Sequence[pb.CachedBatch] = (),
        launch_next: bool = False,
    ) -> StepResult:
        held = sum(
            self._reserved(seq.request)
            for sequences in self.batches.values()
            for seq in sequences.values()
        )
        self.held.append(held + sum(self._reserved(r) for r in batch.requests))
        self.prefill_sizes.append(sum(len(r.input_ids) for r in batch.requests))
        return await super().prefill(batch, cached_batches, launch_next)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("budget-tokenizer"))


def _random_request(rng: random.Random) -> ValidRequest:
    input_ids = [rng.randrange(10, 200) for _ in range(rng.randint(1, PREFILL_BUDGET))]
    return ValidRequest(
        inputs="x",
        input_ids=input_ids,
        params=SamplingParams(temperature=0.0, ignore_eos=True),
        max_new_tokens=rng.randint(1, TOTAL_BUDGET - len(input_ids)),
    )


@pytest.mark.parametrize("block_size", [1, 4, 16])
async def test_budgets_hold_under_a_random_mix_of_lengths(tokenizer, block_size):
    rng = random.Random(block_size)
    shard = BudgetCheckingShard(tokenizer.eos_token_id, block_size)
    config = BatchingConfig(
        max_batch_prefill_tokens=PREFILL_BUDGET,
        max_batch_total_tokens=TOTAL_BUDGET,
        block_size=block_size,
        max_waiting_tokens=rng.randint(1, 5),
    )
    batcher = Batcher(shard, tokenizer, config)
    batcher.start()
    streams = []
    for _ in range(40):
        streams += [batcher.submit(_random_request(rng)) for _ in range(rng.randint(1, 4))]
        await asyncio.sleep(rng.random() * 0.002)
    results = await asyncio.gather(*(stream.collect() for stream in streams))
    await batcher.stop()
    for stream, events in zip(streams, results, strict=True):
        assert len(events) == stream.request.max_new_tokens
    assert max(shard.held) <= TOTAL_BUDGET
    assert max(shard.prefill_sizes) <= PREFILL_BUDGET
    assert max(shard.held) > TOTAL_BUDGET // 2, "the mix never pressed on the budget"
    assert shard.num_sequences == 0
