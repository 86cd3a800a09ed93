"""Stop sequences matched on decoded text, across token boundaries.

Text that could still be the start of a stop sequence is held back, so what is emitted never
contains any part of a matched stop sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopCheck:
    text: str
    """Text safe to emit now."""
    stopped: bool


class StopSequenceMatcher:
    def __init__(self, stop_sequences: Sequence[str]) -> None:
        self._stops = [stop for stop in stop_sequences if stop]
        self._pending = ""

    def feed(self, text: str) -> StopCheck:
        if not self._stops:
            return StopCheck(text, stopped=False)
        pending = self._pending + text
        match = self._first_match(pending)
        if match is not None:
            self._pending = ""
            return StopCheck(pending[:match], stopped=True)
        held = self._partial_match_length(pending)
        self._pending = pending[len(pending) - held :] if held else ""
        return StopCheck(pending[: len(pending) - held], stopped=False)

    def flush(self) -> str:
        """The held-back text, when generation ends for another reason."""
        pending, self._pending = self._pending, ""
        return pending

    def _first_match(self, text: str) -> int | None:
        positions = [pos for pos in (text.find(stop) for stop in self._stops) if pos >= 0]
        return min(positions) if positions else None

    def _partial_match_length(self, text: str) -> int:
        """The longest suffix of `text` that is a proper prefix of some stop sequence."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
