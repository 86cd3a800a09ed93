"""One running batch of the batcher: its requests on the shards, its call in flight, and the
steps of TGI's loop for it (send a Prefill or a Decode, read the answer, filter what ended, turn
the generations into events).

A lane holds the requests whose rows the shards keep for its batch (`running`), those of its
Prefill in flight (`prefilling`), the sequences the router ended that the shards still run
(`stopped`), and its join rule's count of steps waited. The batcher (router/batcher.py) keeps one
lane, or, with pipeline parallelism, up to P, their steps in flight at once; what they share
(the queue, the token budget, the shard calls) is in `LaneParts`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from shardline.proto import generate_pb2 as pb
from shardline.router.client import ShardClient, request_proto
from shardline.router.entry_outcomes import fail, record_success
from shardline.router.errors import IncompleteGenerationError, ValidationError
from shardline.router.generation_events import GenerationEvents
from shardline.router.join_policy import JoinPolicy, may_all_end_next
from shardline.router.metrics import RouterMetrics
from shardline.router.prefix_view import PrefixCacheView
from shardline.router.queue import Entry
from shardline.router.shard_calls import InFlight, ShardCalls
from shardline.shard_answers import GenerationColumns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaneParts:
    """What every lane of one batcher shares."""

    client: ShardClient
    calls: ShardCalls
    events: GenerationEvents
    join: JoinPolicy
    metrics: RouterMetrics
    prefixes: PrefixCacheView | None
    batch_ids: Iterator[int]
    update_gauges: Callable[[], None]  # the batcher's, before each Decode


@dataclass(frozen=True)
class Answered:
    """What the shards answered in one step, for the router to handle once the next is sent."""

    generations: GenerationColumns
    batches: list[pb.CachedBatch]


class BatchLane:
    def __init__(self, parts: LaneParts) -> None:
        self._parts = parts
        self.running: dict[int, Entry] = {}
        self.prefilling: dict[int, Entry] = {}
        self.call: InFlight | None = None
        self._stopped: list[pb.SequenceRef] = []
        self._waiting_steps = 0

    @property
    def held_tokens(self) -> int:
        """The KV slots its requests may need (running, and prefilling in flight)."""
        entries = [*self.running.values(), *self.prefilling.values()]
        return sum(entry.budget_tokens for entry in entries)

    @property
    def prefills_chunk(self) -> bool:
        """Whether its Prefill in flight leaves part of a prompt for later: that entry stays
        first in the queue meanwhile, and no other batch may take from the queue."""
        return any(entry.chunked for entry in self.prefilling.values())

    def clear(self) -> None:
        """Forgets its requests (failed by the batcher) and its call (abandoned)."""
        self.running.clear()
        self.prefilling = {}
        self.call = None

    # ---- the steps ---------------------------------------------------------------------------

    async def start(self, entries: list[Entry]) -> bool:
        """Sends the Prefill of a new batch; False when none of the entries could be sent."""
        self._waiting_steps = 0
        self.call = await self._send_prefill(entries)
        return self.call is not None

    async def answer(self) -> Answered:
        """Its call's answer (the call is done with)."""
        call, self.call = self.call, None
        assert call is not None
        step = self._prefilled(call) if call.method == "prefill" else self._decoded(call)
        generations, batch = await step
        self._waiting_steps += 1
        return Answered(generations, [] if batch is None else [batch])

    async def step(self, answered: Answered, held: int, may_join: bool, look_ahead: bool) -> bool:
        """Sends the next call (a Decode, or a Prefill of joining requests that carries the
        batch), then handles `answered`'s generations while the shards compute; False when
        the batch is done. `held`: the tokens the other lanes hold; `may_join`: whether the
        queue may be taken from; `look_ahead`: whether a Decode may let the shards launch the
        step after it ahead."""
        held_ids = _request_ids(answered.batches)
        if answered.batches:
            on_shard = [entry for rid, entry in self.running.items() if rid in held_ids]
            join = self._parts.join
            joining = join.joining(self._waiting_steps, on_shard, held) if may_join else None
            if joining:
                self._waiting_steps = 0
                # a cut prompt goes on at the next step
                ahead = look_ahead and not any(entry.chunked for entry in joining)
                self.call = await self._send_prefill(joining, answered.batches, ahead)
            else:
                ahead = look_ahead and not may_all_end_next(on_shard)
                self.call = await self._send_decode(answered.batches, ahead)
        self._handle(answered.generations)
        self._forget_off_shard(on_shard=held_ids)
        return self.call is not None

    async def _send_prefill(
        self,
        entries: list[Entry],
        running: Sequence[pb.CachedBatch] = (),
        launch_next: bool = False,
    ) -> InFlight | None:
        """A Prefill of the entries whose shard message builds (the others fail alone); with
        none left, a Decode of `running`, or None when there is nothing to send. `launch_next`
        as for a Decode."""
        requests = self._encodable(entries)
        entries = list(requests)
        if not entries:
            return await self._send_decode(list(running), launch_next=False) if running else None
        metrics = self._parts.metrics
        now = time.monotonic()
        for entry in entries:
            if entry.batched_at is None:
                entry.batched_at = now
                metrics.request_queue_duration.observe(now - entry.queued_at)
            if entry.trace is not None:
                entry.trace.prefill_sent(len(entries), entry.chunk)
        metrics.batch_next_size.observe(len(entries))
        self.prefilling = {entry.id: entry for entry in entries}  # failed by the batcher on a bug
        batch = pb.Batch(
            id=next(self._parts.batch_ids),
            requests=list(requests.values()),
            size=len(entries),
            max_tokens=sum(entry.budget_tokens for entry in entries),
        )
        ids = [batch.id, *(cached.id for cached in running)]
        prefill = self._parts.client.prefill(batch, running, launch_next)
        return await self._parts.calls.send("prefill", prefill, ids)

    async def _prefilled(self, call: InFlight) -> tuple[GenerationColumns, pb.CachedBatch | None]:
        """A Prefill's answer; one that carried the running batch answers for it too."""
        carried = len(call.batch_ids) > 1
        running = list(self.running.values()) if carried else []
        calls = self._parts.calls
        result = await calls.receive(call, running + list(self.prefilling.values()))
        members, self.prefilling = self.prefilling, {}
        if result is None:
            if carried:
                self.running.clear()
            await calls.drop_prefills([e for e in members.values() if e.prefilled or e.chunked])
            return GenerationColumns(), None
        prefixes = self._parts.prefixes
        for request_id, entry in members.items():
            if request_id in result.refused:
                self._refuse(entry, result.refused[request_id])
                continue
            if not entry.chunked:
                self.running[request_id] = entry
            if entry.trace is not None:
                entry.trace.prefill_answered(prompt_done=not entry.chunked)
            entry.prefilled += entry.pass_tokens
            if prefixes is not None:
                prefixes.answered(entry, result.cached_tokens.get(request_id))
        return result.generations, await self._filter(result.batch)

    async def _send_decode(self, batches: list[pb.CachedBatch], launch_next: bool) -> InFlight:
        """`launch_next`: the shards may launch the next step ahead (see the shard engine's
        `decode`); a Prefill joining the batch then takes the running rows from that step."""
        self._parts.update_gauges()
        ids = [batch.id for batch in batches]
        decode = self._parts.client.decode(batches, launch_next)
        return await self._parts.calls.send("decode", decode, ids)

    async def _decoded(self, call: InFlight) -> tuple[GenerationColumns, pb.CachedBatch | None]:
        result = await self._parts.calls.receive(call, list(self.running.values()))
        if result is None:
            self.running.clear()
            return GenerationColumns(), None
        return result.generations, await self._filter(result.batch)

    async def _filter(self, cached: pb.CachedBatch | None) -> pb.CachedBatch | None:
        """Drops the rows of ended and cancelled requests, and of samples the router stopped, from
        the cached batch so their blocks return."""
        self._forget_ended()
        stopped, self._stopped = self._stopped, []
        if cached is None:
            return None
        on_shard = set(cached.request_ids)
        keep = {request_id for request_id in on_shard if request_id in self.running}
        if not keep:
            await self._parts.calls.clear_cache(cached.id)
            return None
        stopped = [ref for ref in stopped if ref.request_id in keep]
        if len(keep) == len(on_shard) and not stopped:
            return cached
        return await self._parts.calls.filter_batch(cached.id, sorted(keep), stopped)

    def _forget_off_shard(self, on_shard: set[int]) -> None:
        """After a step, forgets the requests the shards no longer hold: those that ended and,
        failed first, any the step neither ended nor left there (a sequence the shards never
        generated, say): no token of theirs would come again, and waiting for one would hold
        them, and their clients, for ever. One pass of set lookups per step."""
        off = [request_id for request_id in self.running if request_id not in on_shard]
        dropped = [self.running[request_id] for request_id in off if self.running[request_id].alive]
        if dropped:
            logger.error(
                "the shards dropped requests %s before they ended", [e.id for e in dropped]
            )
            fail(
                dropped, IncompleteGenerationError("the shards dropped the request before it ended")
            )
        for request_id in off:
            del self.running[request_id]

    def _forget_ended(self) -> None:
        """Forgets ended requests (before their rows are filtered from the shards' batch)."""
        for request_id in [rid for rid, entry in self.running.items() if not entry.alive]:
            del self.running[request_id]

    # ---- generations to events ---------------------------------------------------------------

    def _handle(self, generations: GenerationColumns) -> None:
        running, of, reasons = self.running, self._parts.events.of, generations.finish_reasons
        for row, request_id in enumerate(generations.request_ids):
            entry = running.get(request_id)
            if entry is None or not entry.alive:
                continue
            events = of(entry, generations, row)
            if not events or events[-1].finished is None:
                entry.events.put(events)
                continue
            if reasons[row] == pb.FINISH_REASON_NONE and row not in generations.beams:
                # The router ended it (a stop sequence): the shards still run it.
                index = events[-1].sequence_index
                self._stopped.append(pb.SequenceRef(request_id=entry.id, sequence_index=index))
            entry.done = all(seq.done for seq in entry.sequences)
            entry.events.put(events, final=entry.done)
            if entry.done:
                record_success(entry, self._parts.metrics)

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


def _request_ids(batches: Iterable[pb.CachedBatch]) -> set[int]:
    return {request_id for batch in batches for request_id in batch.request_ids}
