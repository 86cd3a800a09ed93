"""The garbage collector after `freeze_long_lived_objects`: what serving keeps alive does not
bring full collections (their pauses land in decode steps)."""

from __future__ import annotations

import gc

from shardline.gc_pauses import freeze_long_lived_objects


def test_objects_kept_alive_after_the_freeze_bring_no_full_collection() -> None:
    """300,000 tracked objects kept alive (as a run's tokens waiting to be read are): ~42
    collections of the middle generation, which under Python's default thresholds bring four
    full ones."""
    full_passes = []

    def count(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            full_passes.append(info)

    saved = gc.get_threshold()
    gc.callbacks.append(count)
    try:
        freeze_long_lived_objects()
        full_passes.clear()
        kept = [[i] for i in range(300_000)]
        assert len(kept) == 300_000 and not full_passes
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*saved)
