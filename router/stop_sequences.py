"""Stop sequences matched on decoded text, across token boundaries.

Text that could still be the start of a stop sequence is held back, so what is emitted never
contains any part of a stop sequence that did not match. The text ends where the first match
starts, or, with `keep_stop` (vLLM's `include_stop_str_in_output`), where it ends.
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
    def __init__(self, stop_sequences: Sequence[str], keep_stop: bool = False) -> None:
        self._stops = [stop for stop in stop_sequences if stop]
        self._keep_stop = keep_stop
        self._pending = ""
        self.matched: str | None = None
        """The stop sequence that matched, once one did."""

    @property
    def watching(self) -> bool:
        """Whether there is any stop sequence to match (else `feed` releases all it gets)."""
        return bool(self._stops)

    def feed(self, text: str) -> StopCheck:
        if not self._stops:
            return StopCheck(text, stopped=False)
        pending = self._pending + text
        match = self._first_match(pending)
        if match is not None:
            position, self.matched = match
            self._pending = ""
            end = position + len(self.matched) if self._keep_stop else position
            return StopCheck(pending[:end], stopped=True)
        held = self._partial_match_length(pending)
        self._pending = pending[len(pending) - held :] if held else ""
        return StopCheck(pending[: len(pending) - held], stopped=False)

    def flush(self) -> str:
        """The held-back text, when generation ends for another reason."""
        pending, self._pending = self._pending, ""
        return pending

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """The earliest match's position and stop sequence (the longest one there)."""
        found = [(text.find(stop), -len(stop), stop) for stop in self._stops]
        matches = [(position, size, stop) for position, size, stop in found if position >= 0]
        if not matches:
            return None
        position, _, stop = min(matches)
        return position, stop

    def _partial_match_length(self, text: str) -> int:
        """The longest suffix of `text` that is a proper prefix of some stop sequence."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
