"""Keeps the garbage collector's full passes short and rare in long-running processes."""

from __future__ import annotations

import gc

# A full collection scans everything serving keeps alive (requests, their tokens and events
# waiting to be read): 60-90 ms a pass at a 1,000-request offline run's peak on the CPU dev
# machine, 20-46 ms gaps in the H100 run's kernel timeline. Python runs one every 10 collections
# of the middle generation (3 in that run); one every 100 left none in it (RESULTS.md,
# session 15). Cyclic garbage that lives that long waits longer to be freed.
FULL_PASS_EVERY = 100


def freeze_long_lived_objects() -> None:
    """Moves everything alive now (a shard's model and its weights' wrappers, a router's
    tokenizer and imported modules) out of the garbage collector's reach, as vLLM does after
    warmup: a full collection then scans only what serving allocates, so its pauses stop
    landing in decode steps, and the router spends ~15 % less CPU per streamed token
    (`python -m benchmarks.router_bench`). Full collections then come FULL_PASS_EVERY
    collections of the middle generation instead of Python's 10."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_PASS_EVERY)
