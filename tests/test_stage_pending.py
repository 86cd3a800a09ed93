"""A pipeline stage but the last holds its Decodes until their tokens come: the held steps finish
in the order they were sent, those of the named batches alone when a call names them, and a
Decode that would take more than the never-cached free blocks is told so. (The stages over gloo:
tests/test_pipeline_parallel.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from shardline.shards.kv_cache import BlockAllocator
from shardline.shards.stage_pending import PendingSteps, needs_more_than_fresh
from shardline.shards.step_result import PendingStep, StepResult


def _step(log: list[str], name: str, token: int) -> PendingStep:
    tokens = torch.tensor([token])

    def finish() -> StepResult:
        log.append(f"tokens of {name}")
        return StepResult(tokens, [token], [0.0], None, None, 0, 0)

    return PendingStep(tokens, finish)


def test_held_steps_finish_in_order_and_a_named_batch_alone() -> None:
    log: list[str] = []
    held = PendingSteps()

    def advance(batch, result) -> None:
        log.append(f"advance {batch.id}")

    first, second = SimpleNamespace(id=3), SimpleNamespace(id=5)
    held.hold(first, _step(log, "3", 11))
    held.hold(second, _step(log, "5", 12))
    assert not log  # answered before the tokens came

    held.complete(advance, [5])
    assert log == ["tokens of 5", "advance 5"]
    assert second.last_tokens.tolist() == [12] and not hasattr(first, "last_tokens")
    held.complete(advance)
    assert log[2:] == ["tokens of 3", "advance 3"] and not held


def test_a_decode_that_would_evict_is_told_so() -> None:
    allocator = BlockAllocator(num_blocks=3, block_size=2)
    allocator.allocate(1)

    def batch(*num_cached: int) -> SimpleNamespace:
        sequences = [SimpleNamespace(num_cached=n, blocks=[0]) for n in num_cached]
        return SimpleNamespace(sequences=sequences)

    assert not needs_more_than_fresh([batch(1, 2, 2)], allocator)  # two new blocks, two free
    assert needs_more_than_fresh([batch(2, 2), batch(3)], allocator)  # three new blocks
