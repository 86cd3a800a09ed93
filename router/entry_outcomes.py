"""How a request's entry ends: failed with an error its stream raises, or done, its metrics
recorded; either way its trace closes."""

from __future__ import annotations

import time
from collections.abc import Iterable

from shardline.router.metrics import RouterMetrics
from shardline.router.queue import Entry


def fail(entries: Iterable[Entry], error: BaseException) -> None:
    """Ends each entry still alive with `error` (the others already ended)."""
    for entry in entries:
        if entry.alive:
            entry.done = True
            entry.events.put([error], final=True)
            if entry.trace is not None:
                entry.trace.close(error)


def record_success(entry: Entry, metrics: RouterMetrics) -> None:
    if entry.trace is not None:
        entry.trace.close()
    inference = time.monotonic() - (entry.batched_at or entry.queued_at)
    generated = entry.generated_tokens
    metrics.request_inference_duration.observe(inference)
    metrics.request_mean_time_per_token_duration.observe(inference / max(generated, 1))
    metrics.request_generated_tokens.observe(generated)
