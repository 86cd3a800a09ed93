"""Driving the router's batcher directly over a fake shard: requests, a batcher with generous
budgets, and a script that continues each prompt with ids of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardline.proto import generate_pb2 as pb
from shardline.router.batcher import Batcher, BatchingConfig
from shardline.router.client import StepResult
from shardline.router.request_types import ValidRequest
from shardline.sampling_params import SamplingParams
from tests.fake_shard import FakeShardClient


def _counting_script(prompt: list[int]) -> list[int]:
    """Continues with ids derived from the prompt, so every request's output is its own."""
    return [(prompt[-1] + step + 10) % 300 + 10 for step in range(64)]


def _request(tokenizer, text: str, max_new_tokens: int, **params) -> ValidRequest:
    return ValidRequest(
        inputs=text,
        input_ids=tokenizer.encode(text),
        params=SamplingParams(temperature=0.0, **params),
        max_new_tokens=max_new_tokens,
    )


def _batcher(tokenizer, fake: FakeShardClient, **config) -> Batcher:
    settings = {"max_batch_prefill_tokens": 4096, "max_batch_total_tokens": 100_000, **config}
    batcher = Batcher(fake, tokenizer, BatchingConfig(**settings))
    batcher.start()
    return batcher


class RecordingShard(FakeShardClient):
    """Logs each decode, counts the tokens it answers per request, and tells whether each
    prefill was sent while a decode ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[str] = []
        self.decoding = 0
        self.prefills_during_decode: list[bool] = []
        self.tokens: dict[int, int] = {}
        self.launch_next: list[bool] = []
        self.prefill_launch_next: list[bool] = []

    async def decode(
        self, batches: Sequence[pb.CachedBatch], launch_next: bool = False
    ) -> StepResult:
        self.log.append("decode")
        self.launch_next.append(launch_next)
        self.decoding += 1
        try:
            result = await super().decode(batches, launch_next)
        finally:
            self.decoding -= 1
        generations = result.generations
        self.tokens.update(zip(generations.request_ids, generations.generated_tokens, strict=True))
        return result

    async def prefill(
        self,
        batch: pb.Batch,
        cached_batches: Sequence[pb.CachedBatch] = (),
        launch_next: bool = False,
    ) -> StepResult:
        self.prefills_during_decode.append(self.decoding > 0)
        self.prefill_launch_next.append(launch_next)
        return await super().prefill(batch, cached_batches, launch_next)
