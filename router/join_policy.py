"""Which waiting requests the next batch takes: TGI's rule for joining a running batch (enough
of them wait, or they waited `max_waiting_tokens` steps) under the prefill and total token
budgets, and whether a running batch may end with the step being sent (its Decode then lets the
shards launch no step ahead). With several batches in flight (pipeline parallelism) each has its
own rule; the total budget counts the tokens the others hold (`held`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from shardline.router.metrics import RouterMetrics
from shardline.router.queue import Entry, RequestQueue

if TYPE_CHECKING:
    from shardline.router.batcher import BatchingConfig


class JoinPolicy:
    def __init__(self, config: BatchingConfig, queue: RequestQueue, metrics: RouterMetrics) -> None:
        self._config = config
        self._queue = queue
        self._metrics = metrics

    def next_batch(
        self, min_size: int | None, running: list[Entry], take: bool = True, held: int = 0
    ) -> list[Entry] | None:
        """The requests that may be prefilled beside `running` now (other batches holding `held`
        tokens), taken from the queue unless `take` is False."""
        cfg = self._config
        max_size = None if cfg.max_batch_size is None else max(cfg.max_batch_size - len(running), 0)
        used = held + sum(entry.budget_tokens for entry in running)
        entries = self._queue.next_batch(
            min_size,
            max_size,
            cfg.max_batch_prefill_tokens,
            cfg.max_batch_total_tokens - used,
            take,
        )
        self._metrics.queue_size.set(len(self._queue))
        return entries

    def joining(
        self, waiting_steps: int, on_shard: list[Entry], held: int = 0
    ) -> list[Entry] | None:
        """The requests that join the running batch now; asked before the last step's
        generations are handled, beside the requests the shards still hold."""
        min_size = self._min_size(waiting_steps, len(on_shard))
        joining = self.next_batch(min_size, on_shard, held=held)
        if joining:
            reason = "backpressure" if min_size is not None else "wait_exceeded"
            self._metrics.batch_concat.inc(reason=reason)
        return joining

    def _min_size(self, waiting_steps: int, running: int) -> int | None:
        """TGI's rule: waiting requests join when enough of them wait, or they waited long."""
        if waiting_steps >= self._config.max_waiting_tokens:
            return None
        return math.floor(running * self._config.waiting_served_ratio)


def may_all_end_next(on_shard: list[Entry]) -> bool:
    """Whether the step being sent may give every running request its last allowed token: a
    step launched behind it would then be one that no row wants, and the Prefill of the waiting
    requests would queue behind it. Stops at the first request that goes on (almost always the
    first)."""
    return all(_may_reach_limit_next(entry) for entry in on_shard)


def _may_reach_limit_next(entry: Entry) -> bool:
    """Whether the step being sent may give a request its last allowed token: the router has
    not handled the step before it yet, hence two tokens to come."""
    generated = max([len(sequence.generated_ids) for sequence in entry.sequences])
    return generated + 2 >= entry.request.max_new_tokens
