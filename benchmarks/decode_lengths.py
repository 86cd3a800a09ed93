"""Context lengths for the rows of one decode step, as a large batch mid-run has them
(benchmarks/attention_kernels.py --lengths mixed): drawn from a workload of (prompt, output)
lengths, or log-uniform without one, seeded, capped at the block table's width."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable

LOG_UNIFORM_LOW = 32

# The order of a step's rows: as drawn, or longest first (the engine's batch order is roughly
# oldest first, and the oldest requests have the longest contexts).
ORDERS: dict[str, Callable[[list[int]], list[int]]] = {
    "random": list,
    "longest": lambda lengths: sorted(lengths, reverse=True),
}


def workload_lengths(
    pairs: list[tuple[int, int]], batch: int, cap: int, rng: random.Random
) -> list[int]:
    """`batch` rows of a decode step in a run of `pairs` (input_len, output_len): a request
    of output length o decodes o - 1 steps (the first token comes from its prefill), reading
    input_len + 1 ... input_len + o - 1 keys, so it is drawn with weight o - 1 (the steps it
    spends in the batch) at one of those steps uniformly; at most `cap` keys."""
    decoding = [(prompt, output) for prompt, output in pairs if output > 1]
    if not decoding:
        raise ValueError("no request of the workload decodes (every output_len <= 1)")
    picks = rng.choices(decoding, weights=[output - 1 for _, output in decoding], k=batch)
    return [min(cap, prompt + rng.randint(1, output - 1)) for prompt, output in picks]


def log_uniform_lengths(batch: int, cap: int, rng: random.Random) -> list[int]:
    """`batch` lengths log-uniform in [LOG_UNIFORM_LOW, cap] (all `cap` if cap is lower)."""
    low = math.log(min(LOG_UNIFORM_LOW, cap))
    return [min(cap, round(math.exp(rng.uniform(low, math.log(cap))))) for _ in range(batch)]


def draw_lengths(pairs: list[tuple[int, int]] | None, batch: int, cap: int, seed: int) -> list[int]:
    """The step's lengths in drawn (random) order: from the workload if given, else
    log-uniform; the same seed gives the same lengths."""
    rng = random.Random(seed)
    if pairs:
        return workload_lengths(pairs, batch, cap, rng)
    return log_uniform_lengths(batch, cap, rng)


def describe(lengths: list[int]) -> str:
    """One line: how many rows, and the keys they read (mean, median, max, total)."""
    return (
        f"rows={len(lengths)} keys mean {statistics.mean(lengths):.0f} "
        f"p50 {statistics.median(lengths):.0f} max {max(lengths)} total {sum(lengths)}"
    )
