"""Decode steps a pipeline stage but the last has answered before their tokens came.

Such a stage answers a Decode once its activations are sent (the router reads the last stage's
answer), so that it computes the next batch's step while the later stages compute this one. The
step's tokens arrive from the last stage later (stage_outputs.py); until then the batch is held
here, and the rest of its step (the tokens recorded, finished rows freed and filtered) waits.

Every rank must still choose alike, and this stage frees finished rows' blocks (and indexes
their prefixes) a step later than the last. So a step is completed, in the order the steps were
sent, before:
- a call that names its batch (it needs the batch as the last stage has it);
- a Prefill, FilterBatch or ClearCache (prefix matches, forks, partial prompts, and the prefix
  cache's least-recently-freed order see every earlier step done, as on the last stage);
- a Decode that needs more blocks than the never-cached free ones (an eviction, or a KV cache
  exhausted here and not there, would differ);
- and else, once the next Decode's activations are sent: its tokens came while that one ran.
A batch of beam searches is never held (the host forks blocks as it picks its beams).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from shardline.shards.batch import ShardBatch
from shardline.shards.kv_cache import BlockAllocator
from shardline.shards.step_result import PendingStep, StepResult


class PendingSteps:
    """The held steps, by batch id. `complete` hands each batch and its step's result, once its
    tokens are in, to `finish` (the engine's advance: tokens recorded, finished rows freed); it
    is not kept, so that the engine holding this is not in a reference cycle, which the
    garbage collector, frozen after warmup, would never free (with the GPU memory it holds)."""

    def __init__(self) -> None:
        self._steps: dict[int, tuple[ShardBatch, PendingStep]] = {}

    def __bool__(self) -> bool:
        return bool(self._steps)

    def hold(self, batch: ShardBatch, step: PendingStep) -> None:
        self._steps[batch.id] = (batch, step)

    def complete(
        self,
        finish: Callable[[ShardBatch, StepResult], object],
        batch_ids: Iterable[int] | None = None,
    ) -> None:
        """Finishes the held steps of `batch_ids` (all with None), oldest first."""
        if not self._steps:
            return
        wanted = self._steps.keys() if batch_ids is None else set(batch_ids)
        for batch_id in [batch_id for batch_id in self._steps if batch_id in wanted]:
            batch, step = self._steps.pop(batch_id)
            result = step.result()
            batch.last_tokens = result.next_tokens
            finish(batch, result)


def needs_more_than_fresh(batches: Iterable[ShardBatch], allocator: BlockAllocator) -> bool:
    """Whether a Decode of `batches` takes more new blocks than the never-cached free ones."""
    size = allocator.block_size
    needy = sum(
        1
        for batch in batches
        for seq in batch.sequences
        if seq.num_cached // size >= len(seq.blocks)
    )
    return needy > allocator.num_fresh
