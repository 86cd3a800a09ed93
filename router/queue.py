"""Validated requests waiting for a batch, and TGI's rule for cutting the next batch."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from shardline.router.detokenizer import IncrementalDetokenizer
from shardline.router.request_types import StreamEvent, ValidRequest
from shardline.router.stop_sequences import StopSequenceMatcher

EventOrError = StreamEvent | BaseException


@dataclass(eq=False)
class SequenceOutput:
    """The text of one of a request's sequences (one of its best_of / n samples or beams)."""

    detokenizer: IncrementalDetokenizer
    stop_matcher: StopSequenceMatcher
    generated_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    done: bool = False


@dataclass(eq=False)
class Entry:
    """One request from the moment it is queued until its last event is sent."""

    id: int
    request: ValidRequest
    sequences: list[SequenceOutput]
    block_size: int = 1
    events: asyncio.Queue[EventOrError] = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    batched_at: float | None = None
    cancelled: bool = False
    done: bool = False

    @property
    def prefill_tokens(self) -> int:
        return self.request.input_length

    @property
    def budget_tokens(self) -> int:
        """KV slots the request may need: its prompt and every token it may generate."""
        return self.request.budget_tokens(self.block_size)

    @property
    def generated_tokens(self) -> int:
        return sum(len(seq.generated_ids) for seq in self.sequences)

    @property
    def alive(self) -> bool:
        return not (self.cancelled or self.done)


class RequestQueue:
    def __init__(self) -> None:
        self._entries: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        self._entries.append(entry)

    def next_batch(
        self,
        min_size: int | None,
        max_size: int | None,
        prefill_token_budget: int,
        token_budget: int,
        take: bool = True,
    ) -> list[Entry] | None:
        """Takes entries in arrival order while they fit both budgets; None when too few fit.

        Cancelled entries are dropped on the way. `take=False` only looks.
        """
        batch = self._fitting(max_size, prefill_token_budget, token_budget)
        if not batch or (min_size is not None and len(batch) < min_size):
            return None
        if not take:
            return batch
        taken = set(batch)
        while self._entries and (not self._entries[0].alive or self._entries[0] in taken):
            self._entries.popleft()
        return batch

    def _fitting(
        self, max_size: int | None, prefill_token_budget: int, token_budget: int
    ) -> list[Entry]:
        """The live entries at the head of the queue that fit the size and both budgets."""
        batch: list[Entry] = []
        prefill_tokens = total_tokens = 0
        for entry in self._entries:
            if max_size is not None and len(batch) >= max_size:
                break
            if not entry.alive:
                continue
            if (
                prefill_tokens + entry.prefill_tokens > prefill_token_budget
                or total_tokens + entry.budget_tokens > token_budget
            ):
                break
            prefill_tokens += entry.prefill_tokens
            total_tokens += entry.budget_tokens
            batch.append(entry)
        return batch

    def drain(self) -> list[Entry]:
        entries = list(self._entries)
        self._entries.clear()
        return entries
