"""A decode step launched before the router asked for it (see ShardEngine.decode).

While the host reads step N's tokens back, answers and waits for the router's next call, step
N+1 already runs on the device. The next Decode takes the rows it names from that step. A
Prefill asked to (`launch_next`) launches the next step of every row it answers (the running
rows one step past the one in flight, the new prompts at their first token) right behind its
forward pass, before reading any token back, so the device goes on while the host records the
tokens and the router handles the new requests' first ones.
"""

from __future__ import annotations

from operator import is_

from shardline.shards.batch import SequenceState, ShardBatch
from shardline.shards.step_result import PendingStep


class StepAhead:
    """A decode step launched before the router asked for it, over `sequences` (the very
    objects: a filtered batch keeps its rows' objects, a new batch has new ones)."""

    def __init__(self, step: PendingStep, sequences: list[SequenceState]) -> None:
        self.step = step
        self.sequences = list(sequences)  # holds them, so their ids stay theirs
        self._rows = {id(seq): row for row, seq in enumerate(self.sequences)}

    def covers(self, batch: ShardBatch) -> bool:
        return self._same(batch.sequences) or all(id(seq) in self._rows for seq in batch.sequences)

    def select(self, sequences: list[SequenceState]) -> PendingStep:
        if self._same(sequences):  # the usual step: the rows it was launched for, in order
            return self.step
        return self.step.select([self._rows[id(seq)] for seq in sequences])

    def _same(self, sequences: list[SequenceState]) -> bool:
        """The very sequences it was launched for, in order (compared in C, not per row)."""
        return len(sequences) == len(self.sequences) and all(map(is_, sequences, self.sequences))


def can_launch_ahead(batch: ShardBatch) -> bool:
    """A beam search picks its tokens on the host, a grammar needs them to mask the next step."""
    return not batch.beams and batch.sampling.grammar is None
