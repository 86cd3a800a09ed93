"""TGI's continuous batching loop, independent of HTTP: submit a `ValidRequest`, iterate events.

The loop cuts a prefill batch from the queue under the prefill and total token budgets, then
decodes it step by step. Between steps, waiting requests join when enough of them wait (or
they waited `max_waiting_tokens` steps): their Prefill carries the running batch, which
decodes one step in the same forward pass, and the answer is one batch of all of them.

The loop runs one step ahead of the router: as soon as step N answers (its cached batch already
without the rows the shards finished), step N+1 is sent (a Decode, or a Prefill of joining
requests), and only then are step N's generations turned into events and cancellations
noticed, while the shards compute. A Decode lets the shards launch the step after it ahead,
unless every running request may end with it: requests that join then prefill in a pass of
their own behind that step (holding the step back for the joining pass to carry left the device
idle while the join was prepared: 1.2 % slower offline, benchmarks/RESULTS.md, session 18).
What the router ends at step N (a stop sequence, a cancellation, a stopped best_of sample) is
filtered out of the cached batch after step N+1, so the shards free its KV blocks; its step N+1
token is dropped.

With pipeline parallelism (P stages) up to P batches run at once, each a lane of its own
(router/batch_lane.py) with its own join rule: the step of one is sent as soon as another's is
sent, not answered, so that each stage computes one batch's step while the others compute
theirs. The calls stay numbered, so every rank runs them in the order they were sent; an idle
lane starts a batch of the waiting requests that fit beside the others' tokens.

One request's bad data fails that request alone: one whose shard message cannot be built is
dropped from its Prefill (validation refuses such requests first), and one a shard refuses
(`StepResult.refused`) fails while the others of its Prefill run on. A shard call that fails
gets its requests a 424 and the batch is cleared, and the loop goes on.
A shard call past its deadline (`ShardTimeoutError`) is different: a stuck shard, or ranks
stuck in a collective, cannot be recovered from, so the loop gives up for good: every request,
running or queued, gets a 424, `stuck` is set (/health answers 503) and `wait_stuck` returns,
for the router to exit and the launcher to restart everything.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from shardline.router import tracing
from shardline.router.batch_lane import BatchLane, LaneParts
from shardline.router.client import ShardClient, ShardTimeoutError
from shardline.router.entry_outcomes import fail
from shardline.router.errors import GenerationError, IncompleteGenerationError, RouterError
from shardline.router.generation_events import GenerationEvents
from shardline.router.join_policy import JoinPolicy
from shardline.router.metrics import RouterMetrics
from shardline.router.paced_admission import (
    SERVER_SCHEDULING_POLICY,
    PacedAdmission,
    SchedulingPolicy,
    check_policy,
)
from shardline.router.prefix_view import PrefixCacheView
from shardline.router.queue import Entry, RequestQueue
from shardline.router.request_stream import RequestStream
from shardline.router.request_types import ValidRequest
from shardline.router.shard_calls import ShardCalls

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int | None = None
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    block_size: int = 1
    # The shards prefill prompts in chunks: a prompt that does not fit a batch's prefill budget
    # joins with the part that does, and the rest follows in the next steps.
    prefill_chunking: bool = False
    # The shards reuse cached prompt prefixes: the prefill budget counts only what they compute.
    prefix_caching: bool = False
    # Batches in flight at once: the pipeline's stages (P), one batch for each to compute.
    batches_in_flight: int = 1
    # Arrival order (TGI's), or longest first at a pace that spreads a known backlog's short
    # requests over its longest one's steps (router/paced_admission.py).
    scheduling_policy: SchedulingPolicy = SERVER_SCHEDULING_POLICY

    def __post_init__(self) -> None:
        check_policy(self.scheduling_policy)


class Batcher:
    def __init__(
        self,
        client: ShardClient,
        tokenizer: Any,
        config: BatchingConfig,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self._client = client
        self._events = GenerationEvents(tokenizer)
        self.config = config
        self._metrics = metrics or RouterMetrics()
        self._prefixes = (
            PrefixCacheView.of(config, self._metrics) if config.prefix_caching else None
        )
        pace = PacedAdmission() if config.scheduling_policy == "paced" else None
        self._queue = RequestQueue(config.prefill_chunking, self._prefixes, pace)
        self._join = JoinPolicy(config, self._queue, self._metrics)
        self._calls = ShardCalls(client, self._metrics)
        parts = LaneParts(
            client,
            self._calls,
            self._events,
            self._join,
            self._metrics,
            self._prefixes,
            itertools.count(),
            self._update_gauges,
        )
        self._depth = config.batches_in_flight
        self._lanes = [BatchLane(parts) for _ in range(self._depth)]
        self._request_ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stuck: ShardTimeoutError | None = None
        self._stuck_event = asyncio.Event()

    # ---- the caller's side -------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._fail_everything(IncompleteGenerationError("the server is shutting down"))

    def submit(self, request: ValidRequest) -> RequestStream:
        if self._task is None:
            raise RuntimeError("Batcher.start() was not called")
        if self.stuck is not None:
            raise GenerationError(str(self.stuck))
        entry = Entry(
            id=next(self._request_ids),
            request=request,
            sequences=self._events.sequence_outputs(request),
            block_size=self.config.block_size,
        )
        entry.trace = tracing.entry_trace(entry)
        self._queue.append(entry)
        self._metrics.queue_size.set(len(self._queue))
        self._wakeup.set()
        return RequestStream(entry)

    async def wait_stuck(self) -> ShardTimeoutError:
        """Returns once a shard call ran past its deadline (the loop has stopped)."""
        await self._stuck_event.wait()
        assert self.stuck is not None
        return self.stuck

    @property
    def oldest_step_s(self) -> float:
        """Seconds the oldest Prefill or Decode in flight has run so far (0 when none)."""
        return self._calls.oldest_s

    @property
    def running_size(self) -> int:
        return sum(len(lane.running) for lane in self._lanes)

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    # ---- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._batch_forever()
        except ShardTimeoutError as error:
            await self._give_up(error)

    async def _batch_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._release_cancelled_prefills()
            while True:
                self._queue.let_in()
                entries = self._join.next_batch(None, self._running_entries())
                if not entries:
                    break
                try:
                    await self._serve(entries)
                except ShardTimeoutError:
                    raise
                except Exception as error:  # the loop must outlive any bug in one batch
                    logger.exception("batch failed")
                    await self._drop_batch(GenerationError(f"internal error: {error}"))
                    await self._calls.clear_cache(None)
                    if self._prefixes is not None:
                        self._prefixes.clear()
                self._update_gauges()

    async def _drop_batch(self, error: RouterError) -> None:
        """Abandons the calls in flight and fails every running and prefilling request."""
        await self._calls.abandon()
        prefills = self._queue.partly_prefilled()
        prefilling = [entry for lane in self._lanes for entry in lane.prefilling.values()]
        fail([*self._running_entries(), *prefilling, *prefills], error)
        for lane in self._lanes:
            lane.clear()

    async def _fail_everything(self, error: RouterError) -> None:
        await self._drop_batch(error)
        fail(self._queue.drain(), error)
        self._update_gauges()

    async def _give_up(self, error: ShardTimeoutError) -> None:
        logger.error("%s; failing every request", error)
        self.stuck = error
        await self._fail_everything(GenerationError(str(error)))
        self._stuck_event.set()

    async def _serve(self, entries: list[Entry]) -> None:
        """Runs batches until none is left, each one step ahead of the router: a batch's next
        call is sent as soon as its step answers, then the router handles that step's
        generations while the shards compute. The next call is a Decode, or, when TGI's rule
        lets waiting requests join, a Prefill of those that carries the batch (it decodes in
        the same pass). With several lanes, `flight` holds those with a call in flight, in the
        order the calls were sent (the order the shards run them)."""
        flight: deque[BatchLane] = deque()
        if await self._lanes[0].start(entries):
            flight.append(self._lanes[0])
        while flight:
            if len(flight) < self._depth:
                await self._start_lanes(flight)
            lane = flight.popleft()
            answered = await lane.answer()
            await self._release_cancelled_prefills()
            may_join = not any(other.prefills_chunk for other in flight)
            held = sum(other.held_tokens for other in flight)
            if await lane.step(answered, held, may_join, look_ahead=self._depth == 1):
                flight.append(lane)
            self._queue.let_in()  # what the requests that ended in that step make room for

    async def _start_lanes(self, flight: deque[BatchLane]) -> None:
        """Idle lanes start batches of the waiting requests that fit beside the others (not
        while a prompt's chunk is in flight: it stays in the queue until answered)."""
        for lane in self._lanes:
            if lane in flight:
                continue
            if any(other.prefills_chunk for other in flight):
                return
            held = sum(other.held_tokens for other in flight)
            entries = self._join.next_batch(None, [], held=held)
            if not entries:
                return
            if await lane.start(entries):
                flight.append(lane)

    def _running_entries(self) -> list[Entry]:
        return [entry for lane in self._lanes for entry in lane.running.values()]

    async def _release_cancelled_prefills(self) -> None:
        """Frees the shards' part of the prompts of cancelled requests prefilled in part."""
        cancelled = [
            entry
            for entry in self._queue.partly_prefilled()
            if not entry.alive and not any(entry.id in lane.prefilling for lane in self._lanes)
        ]
        await self._calls.drop_prefills(cancelled)

    # ---- bookkeeping -------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        lanes = self._lanes
        self._metrics.batch_current_size.set(sum(len(lane.running) for lane in lanes))
        self._metrics.batch_current_max_tokens.set(
            sum(entry.budget_tokens for lane in lanes for entry in lane.running.values())
        )
        self._metrics.queue_size.set(len(self._queue))
