"""The `paced` scheduling policy: how many waiting requests are let into the queue at once.

A run of known requests (the offline `LLM`, or a burst sent to the server as a batch job) ends
with its longest request, after as many steps as that request's tokens. A step costs at least
one read of the weights however few rows it has, so the cheapest run spreads the other
requests' tokens over those steps instead of running them all at the start and leaving the
longest requests to decode alone at the end, in small weight-bound steps. `PacedAdmission`
holds the submitted requests longest first (by `max_new_tokens`, then arrival) and lets them
into the router's queue while fewer than `PACE_FACTOR` x (tokens left to generate) / (steps the
longest request still needs) of those it let in are unfinished, looking again each time one
ends; the join rule, `max_batch_size` and the token budgets still bound the batch. Tokens left
are estimated from each request's `max_new_tokens` (an upper bound: a request ending at EOS
frees its slot, and the estimate follows).

On the 8B shape's 1,000 ShareGPT-shaped requests the floor of the schedule (per-step cost model
of benchmarks/offline_floor.py, H100 ceilings, TGI's join rule) falls from 13.54 s in arrival
order (`fcfs`) and 12.85 s longest first, up to 512 at once, to 11.51 s at this pace
(benchmarks/schedule_sim.py). It holds requests back, so their time to first token grows: a
policy for throughput over a known backlog, not for interactive traffic (`fcfs`, TGI's, is the
server's default).
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from shardline.router.queue import Entry

SchedulingPolicy = Literal["fcfs", "paced"]
SCHEDULING_POLICIES: tuple[SchedulingPolicy, ...] = ("fcfs", "paced")
SERVER_SCHEDULING_POLICY: SchedulingPolicy = "fcfs"  # TGI's; the offline LLM's is `paced`
PACE_FACTOR = 1.5  # the schedule simulation's best of 0.8 to 2.0


def check_policy(name: str) -> None:
    if name not in SCHEDULING_POLICIES:
        raise ValueError(f"scheduling_policy {name!r} is not one of {SCHEDULING_POLICIES}")


def pace_limit(tokens_left: int, longest_chain: int, factor: float | None = None) -> int:
    """How many requests may be unfinished at once: enough rows per step to generate every
    token left within the steps the longest request still needs, times `factor` (PACE_FACTOR
    as it is at the call: the benchmarks set it)."""
    factor = PACE_FACTOR if factor is None else factor
    return max(1, math.ceil(factor * tokens_left / max(longest_chain, 1)))


class PacedAdmission:
    def __init__(self) -> None:
        self._held: list[Entry] = []  # longest first; equals in arrival order
        self._held_tokens = 0
        self._let_in: list[Entry] = []  # let into the queue and not ended
        self._limit = 0  # stale once one of those ends or a request arrives

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, entry: Entry) -> None:
        bisect.insort(self._held, entry, key=_most_steps_first)
        self._held_tokens += _all_tokens(entry)
        self._limit = 0

    def let_in(self) -> list[Entry]:
        """The held entries that may join the queue now, in the order they should."""
        if not self._held:
            return []
        unfinished = [entry for entry in self._let_in if entry.alive]
        if len(unfinished) < len(self._let_in) or not self._limit:
            self._limit = self._pace(unfinished)
        self._let_in = unfinished
        moving = []
        # Letting one in moves its tokens from held to unfinished and (longest first) never
        # lengthens the chain: the limit changes only as tokens are generated.
        while self._held and len(self._let_in) < self._limit:
            entry = self._held.pop(0)
            self._held_tokens -= _all_tokens(entry)
            if entry.alive:  # a request cancelled while held just goes
                self._let_in.append(entry)
                moving.append(entry)
        return moving

    def drain(self) -> list[Entry]:
        held, self._held, self._held_tokens = self._held, [], 0
        return held

    def _pace(self, unfinished: list[Entry]) -> int:
        left = [_left(entry) for entry in unfinished]
        tokens = self._held_tokens + sum(tokens for tokens, _ in left)
        chain = max([steps for _, steps in left] + [self._held[0].request.max_new_tokens])
        return pace_limit(tokens, chain)


def _most_steps_first(entry: Entry) -> int:
    return -entry.request.max_new_tokens


def _all_tokens(entry: Entry) -> int:
    return len(entry.sequences) * entry.request.max_new_tokens


def _left(entry: Entry) -> tuple[int, int]:
    """(tokens, steps) an unfinished request may still generate."""
    width = len(entry.sequences)
    generated = entry.generated_tokens
    most = entry.request.max_new_tokens
    return width * most - generated, most - generated // width
