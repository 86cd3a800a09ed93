"""Validated requests waiting for a batch, and TGI's rule for cutting the next batch."""

from __future__ import annotations

import functools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shardline.router.detokenizer import IncrementalDetokenizer
from shardline.router.event_channel import EventChannel
from shardline.router.paced_admission import PacedAdmission
from shardline.router.prefix_view import PrefixCacheView
from shardline.router.request_types import ValidRequest
from shardline.router.stop_sequences import StopSequenceMatcher

if TYPE_CHECKING:
    from shardline.router.tracing import EntryTrace


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
    events: EventChannel = field(default_factory=EventChannel)
    queued_at: float = field(default_factory=time.monotonic)
    batched_at: float | None = None
    cancelled: bool = False
    done: bool = False
    # Chunked prefill: prompt tokens already prefilled on the shards, and those the batch being
    # cut or sent computes (the rest of the prompt, or a chunk of it).
    prefilled: int = 0
    chunk: int = 0
    # Prefix caching: the leading prompt tokens the shards are expected to find cached (the
    # shards' own count once they answered its first pass), its full blocks' prefix hashes, and
    # the version of the router's view that `cached` was expected under.
    cached: int = 0
    prefix_hashes: list[int] | None = None
    expected_at: int = -1
    trace: EntryTrace | None = None  # its spans, when its HTTP request is traced

    @property
    def prefill_tokens(self) -> int:
        """The prompt tokens still to compute (those expected cached are not)."""
        return self.request.input_length - max(self.prefilled, self.cached)

    @property
    def pass_tokens(self) -> int:
        """The prompt tokens the batch being sent takes on: those expected cached, then the
        `chunk` it computes."""
        return max(self.prefilled, self.cached) - self.prefilled + self.chunk

    @property
    def chunked(self) -> bool:
        """Whether the batch being sent leaves part of this prompt for later."""
        return self.chunk < self.prefill_tokens

    @functools.cached_property
    def budget_tokens(self) -> int:
        """KV slots the request may need: its prompt and every token it may generate (summed
        over the running batch at every step, hence kept)."""
        return self.request.budget_tokens(self.block_size)

    @property
    def generated_tokens(self) -> int:
        return sum(len(seq.generated_ids) for seq in self.sequences)

    @property
    def alive(self) -> bool:
        return not (self.cancelled or self.done)


class RequestQueue:
    """Waiting requests in arrival order, or, with a `pace` (the `paced` scheduling policy),
    held by it and queued in its order as it lets them in. With `chunking`, the entry that does
    not fit a batch's prefill budget joins with the chunk of its prompt that does, and stays
    first in the queue until its prompt is prefilled (TGI v3's chunked prefill)."""

    def __init__(
        self,
        chunking: bool = False,
        prefixes: PrefixCacheView | None = None,
        pace: PacedAdmission | None = None,
    ) -> None:
        self._entries: deque[Entry] = deque()
        self.chunking = chunking
        self._prefixes = prefixes
        self._pace = pace

    def __len__(self) -> int:
        """The requests waiting, held by the pace or queued."""
        return len(self._entries) + (len(self._pace) if self._pace is not None else 0)

    @property
    def queued(self) -> bool:
        """Whether any request is queued (not held by the pace)."""
        return bool(self._entries)

    def append(self, entry: Entry) -> None:
        if self._pace is None:
            self._entries.append(entry)
        else:  # let in by the batcher's loop, once every request submitted with it is held
            self._pace.hold(entry)

    def let_in(self) -> None:
        """Queues what the pace lets in now; nothing without one."""
        if self._pace is not None:
            self._entries.extend(self._pace.let_in())

    def next_batch(
        self,
        min_size: int | None,
        max_size: int | None,
        prefill_token_budget: int,
        token_budget: int,
        take: bool = True,
    ) -> list[Entry] | None:
        """Takes entries in arrival order while they fit both budgets (each with its `chunk`);
        None when too few fit, and always the prompt under way when there is one. An entry
        whose prompt starts with blocks that an entry taken before it computes waits for the
        next batch, where it finds them cached (prefix caching).

        Cancelled entries are dropped on the way; an entry whose prompt is prefilled in part
        stays. `take=False` only looks.
        """
        if self.prefill_under_way:
            min_size = None
        batch = self._fitting(max_size, prefill_token_budget, token_budget)
        if not batch or (min_size is not None and len(batch) < min_size):
            return None
        if not take:
            return batch
        taken = {entry for entry in batch if not entry.chunked}
        while self._entries and (not self._entries[0].alive or self._entries[0] in taken):
            self._entries.popleft()
        if any(entry in taken for entry in self._entries):  # some waited for a shared prefix
            self._entries = deque(e for e in self._entries if e.alive and e not in taken)
        return batch

    @property
    def prefill_under_way(self) -> bool:
        """Whether the first live entry's prompt was prefilled in part."""
        head = next((entry for entry in self._entries if entry.alive), None)
        return head is not None and head.prefilled > 0

    def partly_prefilled(self) -> list[Entry]:
        """The entries (live or not) whose prompts the shards hold in part. Such an entry stays
        first among the live ones until its prompt is done, so the scan stops at the first live
        entry that is not one (it runs every step: it must not walk a long queue)."""
        found = []
        for entry in self._entries:
            if entry.prefilled:
                found.append(entry)
            elif entry.alive:
                break
        return found

    def _fitting(
        self, max_size: int | None, prefill_token_budget: int, token_budget: int
    ) -> list[Entry]:
        """The live entries at the head of the queue that fit the size and both budgets."""
        batch: list[Entry] = []
        prefill_tokens = total_tokens = 0
        computing: set[int] = set()  # prefix blocks the batch computes
        for entry in self._entries:
            if max_size is not None and len(batch) >= max_size:
                break
            if not entry.alive:
                continue
            if total_tokens + entry.budget_tokens > token_budget:
                break
            if self._prefixes is not None and not entry.prefilled:
                self._prefixes.expect(entry)
                if self._prefixes.waits_for(entry, computing):
                    continue
            entry.chunk = min(entry.prefill_tokens, prefill_token_budget - prefill_tokens)
            if entry.chunked and not (self.chunking and entry.chunk > 0):
                break
            prefill_tokens += entry.chunk
            total_tokens += entry.budget_tokens
            batch.append(entry)
            if self._prefixes is not None:
                computing.update(self._prefixes.computed(entry))
            if entry.chunked:
                break
        return batch

    def drain(self) -> list[Entry]:
        entries = list(self._entries)
        self._entries.clear()
        return entries + (self._pace.drain() if self._pace is not None else [])
