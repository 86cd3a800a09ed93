"""TGI's continuous batching loop, independent of HTTP: submit a `ValidRequest`, iterate events.

The loop cuts a prefill batch from the queue under the prefill and total token budgets, then
decodes it step by step. Between steps, waiting requests join when enough of them wait (or
they waited `max_waiting_tokens` steps): their Prefill carries the running batch, which
decodes one step in the same forward pass, and the answer is one batch of all of them.

The loop runs one step ahead of the router: as soon as step N answers (its cached batch already
without the rows the shards finished), step N+1 is sent (a Decode, or a Prefill of joining
requests), and only then are step N's generations turned into events and cancellations
noticed, while the shards compute. A Decode sent when no request is expected to join at the
next step lets the shards launch that step ahead. What the router ends at step N (a stop
sequence, a cancellation, a stopped best_of sample) is filtered out of the cached batch after
step N+1, so the shards free its KV blocks; its step N+1 token is dropped.

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
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardline.proto import generate_pb2 as pb
from shardline.router import tracing
from shardline.router.client import ShardClient, ShardTimeoutError, request_proto
from shardline.router.entry_outcomes import fail, record_success
from shardline.router.errors import (
    GenerationError,
    IncompleteGenerationError,
    RouterError,
    ValidationError,
)
from shardline.router.generation_events import GenerationEvents
from shardline.router.join_policy import JoinPolicy
from shardline.router.metrics import RouterMetrics
from shardline.router.prefix_view import PrefixCacheView
from shardline.router.queue import Entry, RequestQueue
from shardline.router.request_stream import RequestStream
from shardline.router.request_types import ValidRequest
from shardline.router.shard_calls import InFlight, ShardCalls

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


@dataclass
class _Answered:
    """What the shards answered in one step, for the router to handle once the next is sent."""

    generations: list[pb.Generation] = field(default_factory=list)
    batches: list[pb.CachedBatch] = field(default_factory=list)

    def add(self, generations: list[pb.Generation], batch: pb.CachedBatch | None) -> None:
        self.generations += generations
        if batch is not None:
            self.batches.append(batch)


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
        self._queue = RequestQueue(config.prefill_chunking, self._prefixes)
        self._join = JoinPolicy(config, self._queue, self._metrics)
        self._calls = ShardCalls(client, self._metrics)
        self._running: dict[int, Entry] = {}
        self._prefilling: dict[int, Entry] = {}
        self._request_ids = itertools.count()
        self._batch_ids = itertools.count()
        self._wakeup = asyncio.Event()
        # Sequences the router ended (a stop sequence matched) that the shards still run.
        self._stopped: list[pb.SequenceRef] = []
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
        return len(self._running)

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
            while entries := self._join.next_batch(None, list(self._running.values())):
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
        fail([*self._running.values(), *self._prefilling.values(), *prefills], error)
        self._running.clear()
        self._prefilling = {}

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
        """Runs the batch until it is empty, one step ahead of the router: the next call is sent
        as soon as a step answers, then the router handles that step's generations while the
        shards compute. The next call is a Decode, or, when TGI's rule lets waiting requests
        join, a Prefill of those that carries the running batch (it decodes in the same pass)."""
        answered = _Answered()
        first = await self._send_prefill(entries)
        if first is None:
            return
        answered.add(*await self._prefilled(first))
        waiting_steps = 1
        while answered.generations or answered.batches:
            call = None
            await self._release_cancelled_prefills()
            held_ids = _request_ids(answered.batches)
            if answered.batches:
                on_shard = self._on_shard(held_ids)
                joining = self._join.joining(waiting_steps, on_shard)
                waiting_steps = 0 if joining else waiting_steps
                call = await (
                    self._send_prefill(joining, answered.batches)
                    if joining
                    else self._send_decode(
                        answered.batches, not self._join.join_likely_next(waiting_steps, on_shard)
                    )
                )
            self._handle(answered.generations)
            self._forget_ended(on_shard=held_ids)
            answered = _Answered()
            if call is not None:
                step = self._prefilled(call) if call.method == "prefill" else self._decoded(call)
                answered.add(*await step)
                waiting_steps += 1

    def _on_shard(self, held_ids: set[int]) -> list[Entry]:
        """The running requests whose rows the shards' cached batches hold."""
        return [entry for rid, entry in self._running.items() if rid in held_ids]

    async def _send_prefill(
        self, entries: list[Entry], running: Sequence[pb.CachedBatch] = ()
    ) -> InFlight | None:
        """A Prefill of the entries whose shard message builds (the others fail alone); with
        none left, a Decode of `running`, or None when there is nothing to send."""
        requests = self._encodable(entries)
        entries = list(requests)
        if not entries:
            return await self._send_decode(list(running), launch_next=False) if running else None
        now = time.monotonic()
        for entry in entries:
            if entry.batched_at is None:
                entry.batched_at = now
                self._metrics.request_queue_duration.observe(now - entry.queued_at)
            if entry.trace is not None:
                entry.trace.prefill_sent(len(entries), entry.chunk)
        self._metrics.batch_next_size.observe(len(entries))
        self._prefilling = {entry.id: entry for entry in entries}  # failed by `_run` on a bug
        batch = pb.Batch(
            id=next(self._batch_ids),
            requests=list(requests.values()),
            size=len(entries),
            max_tokens=sum(entry.budget_tokens for entry in entries),
        )
        ids = [batch.id, *(cached.id for cached in running)]
        return await self._calls.send("prefill", self._client.prefill(batch, running), ids)

    async def _prefilled(self, call: InFlight) -> tuple[list[pb.Generation], pb.CachedBatch | None]:
        """A Prefill's answer; one that carried the running batch answers for it too."""
        carried = len(call.batch_ids) > 1
        running = list(self._running.values()) if carried else []
        result = await self._calls.receive(call, running + list(self._prefilling.values()))
        members, self._prefilling = self._prefilling, {}
        if result is None:
            if carried:
                self._running.clear()
            await self._calls.drop_prefills(
                [e for e in members.values() if e.prefilled or e.chunked]
            )
            return [], None
        for request_id, entry in members.items():
            if request_id in result.refused:
                self._refuse(entry, result.refused[request_id])
                continue
            if not entry.chunked:
                self._running[request_id] = entry
            if entry.trace is not None:
                entry.trace.prefill_answered(prompt_done=not entry.chunked)
            entry.prefilled += entry.pass_tokens
            if self._prefixes is not None:
                self._prefixes.answered(entry, result.cached_tokens.get(request_id))
        return result.generations, await self._filter(result.batch)

    async def _send_decode(self, batches: list[pb.CachedBatch], launch_next: bool) -> InFlight:
        """`launch_next`: no request is expected to join at the next step, so the shards may
        launch it ahead (see the shard engine's `decode`)."""
        self._update_gauges()
        ids = [batch.id for batch in batches]
        return await self._calls.send("decode", self._client.decode(batches, launch_next), ids)

    async def _decoded(self, call: InFlight) -> tuple[list[pb.Generation], pb.CachedBatch | None]:
        result = await self._calls.receive(call, list(self._running.values()))
        if result is None:
            self._running.clear()
            return [], None
        return result.generations, await self._filter(result.batch)

    async def _filter(self, cached: pb.CachedBatch | None) -> pb.CachedBatch | None:
        """Drops the rows of ended and cancelled requests, and of samples the router stopped, from
        the cached batch so their blocks return."""
        self._forget_ended(on_shard=set())
        stopped, self._stopped = self._stopped, []
        if cached is None:
            return None
        on_shard = set(cached.request_ids)
        keep = {request_id for request_id in on_shard if request_id in self._running}
        if not keep:
            await self._calls.clear_cache(cached.id)
            return None
        stopped = [ref for ref in stopped if ref.request_id in keep]
        if len(keep) == len(on_shard) and not stopped:
            return cached
        return await self._calls.filter_batch(cached.id, sorted(keep), stopped)

    def _forget_ended(self, on_shard: set[int]) -> None:
        """Forgets ended requests, but those whose rows the shards still hold (until filtered)."""
        for request_id in [
            request_id
            for request_id, entry in self._running.items()
            if not entry.alive and request_id not in on_shard
        ]:
            del self._running[request_id]

    async def _release_cancelled_prefills(self) -> None:
        """Frees the shards' part of the prompts of cancelled requests prefilled in part."""
        cancelled = [entry for entry in self._queue.partly_prefilled() if not entry.alive]
        await self._calls.drop_prefills(cancelled)

    # ---- generations to events ---------------------------------------------------------------

    def _handle(self, generations: Iterable[pb.Generation]) -> None:
        for generation in generations:
            entry = self._running.get(generation.request_id)
            if entry is None or not entry.alive:
                continue
            events = self._events.of(entry, generation)
            if not events or events[-1].finished is None:
                entry.events.put(events)
                continue
            if generation.finish_reason == pb.FINISH_REASON_NONE and not generation.beams:
                # The router ended it (a stop sequence): the shards still run it.
                index = events[-1].sequence_index
                self._stopped.append(pb.SequenceRef(request_id=entry.id, sequence_index=index))
            entry.done = all(seq.done for seq in entry.sequences)
            entry.events.put(events, final=entry.done)
            if entry.done:
                record_success(entry, self._metrics)

    def _encodable(self, entries: list[Entry]) -> dict[Entry, pb.Request]:
        """Each entry's shard message, in order; an entry whose message cannot be built fails
        alone (a bug past validation, which builds it too)."""
        built = {}
        for entry in entries:
            chunk_len = entry.pass_tokens if entry.chunked else 0
            try:
                built[entry] = request_proto(entry.request, entry.id, entry.prefilled, chunk_len)
            except (ValueError, TypeError) as error:
                logger.error("request %d cannot be sent to the shards: %s", entry.id, error)
                fail([entry], ValidationError(f"the request cannot be sent: {error}"))
        return built

    def _refuse(self, entry: Entry, reason: str) -> None:
        """A request the shards refused: they kept nothing of it (nor of its prompt's chunks)."""
        logger.error("the shards refused request %d: %s", entry.id, reason)
        entry.prefilled = 0
        fail([entry], ValidationError(f"the model refused the request: {reason}"))

    # ---- bookkeeping -------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        self._metrics.batch_current_size.set(len(self._running))
        self._metrics.batch_current_max_tokens.set(
            sum(entry.budget_tokens for entry in self._running.values())
        )
        self._metrics.queue_size.set(len(self._queue))


def _request_ids(batches: Iterable[pb.CachedBatch]) -> set[int]:
    return {request_id for batch in batches for request_id in batch.request_ids}
