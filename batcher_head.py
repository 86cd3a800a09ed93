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

A shard call that fails gets its requests a 424 and the batch is cleared, and the loop goes on.
A shard call past its deadline (`ShardTimeoutError`) is different: a stuck shard, or ranks
stuck in a collective, cannot be recovered from, so the loop gives up for good: every request,
running or queued, gets a 424, `stuck` is set (/health answers 503) and `wait_stuck` returns,
for the router to exit and the launcher to restart everything.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardline.proto import generate_pb2 as pb
from shardline.router.client import ShardClient, ShardTimeoutError, StepResult
from shardline.router.detokenizer import IncrementalDetokenizer, backend_tokenizer
from shardline.router.errors import GenerationError, IncompleteGenerationError, RouterError
from shardline.router.metrics import RouterMetrics
from shardline.router.queue import Entry, RequestQueue, SequenceOutput
from shardline.router.request_types import (
    Finished,
    FinishReason,
    StreamEvent,
    Token,
    ValidRequest,
)
from shardline.router.stop_sequences import StopSequenceMatcher

logger = logging.getLogger(__name__)

_SHARD_FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_EOS_TOKEN: FinishReason.EOS_TOKEN,
    pb.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
}

# Event loop turns a started shard call needs before its request is written: the gRPC client
# sends from a task of its own, which must run before the router's work on the last step.
_YIELDS_TO_SEND = 2


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


class RequestStream:
    """The events of one request, in order; the last one carries `finished`.

    Iterating raises the request's error (a `RouterError`) if generation failed. `cancel()`
    (e.g. when the client disconnects) drops the request from its batch after the current step.
    """

    def __init__(self, entry: Entry) -> None:
        self._entry = entry
        self._ended = False
        self._unfinished = len(entry.sequences)

    @property
    def request(self) -> ValidRequest:
        return self._entry.request

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._ended:
            raise StopAsyncIteration
        item = await self._entry.events.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item.finished is not None:
            self._unfinished -= 1
        self._ended = self._unfinished == 0
        return item

    async def collect(self) -> list[StreamEvent]:
        return [event async for event in self]

    def cancel(self) -> None:
        if self._entry.alive:
            self._entry.cancelled = True


@dataclass
class _InFlight:
    """A shard call on its way; its task answers the result and the seconds it took."""

    method: str
    task: asyncio.Future[tuple[StepResult, float]]
    batch_ids: list[int]


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
        self._tokenizer = tokenizer
        self._backend_tokenizer = backend_tokenizer(tokenizer)
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self.config = config
        self._metrics = metrics or RouterMetrics()
        self._queue = RequestQueue(chunking=config.prefill_chunking)
        self._running: dict[int, Entry] = {}
        self._prefilling: dict[int, Entry] = {}
        self._request_ids = itertools.count()
        self._batch_ids = itertools.count()
        self._wakeup = asyncio.Event()
        # Sequences the router ended (a stop sequence matched) that the shards still run.
        self._stopped: list[pb.SequenceRef] = []
        self._in_flight: set[asyncio.Future[tuple[StepResult, float]]] = set()
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
            sequences=[self._sequence_output(request) for _ in range(_returned(request))],
            block_size=self.config.block_size,
        )
        self._queue.append(entry)
        self._metrics.queue_size.set(len(self._queue))
        self._wakeup.set()
        return RequestStream(entry)

    def _sequence_output(self, request: ValidRequest) -> SequenceOutput:
        return SequenceOutput(
            detokenizer=IncrementalDetokenizer(
                self._tokenizer, request.input_ids, request.params.skip_special_tokens
            ),
            stop_matcher=StopSequenceMatcher(request.params.stop),
        )

    async def wait_stuck(self) -> ShardTimeoutError:
        """Returns once a shard call ran past its deadline (the loop has stopped)."""
        await self._stuck_event.wait()
        assert self.stuck is not None
        return self.stuck

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
            while entries := self._next_batch(min_size=None):
                try:
                    await self._serve(entries)
                except ShardTimeoutError:
                    raise
                except Exception as error:  # the loop must outlive any bug in one batch
                    logger.exception("batch failed")
                    await self._drop_batch(GenerationError(f"internal error: {error}"))
                    await self._clear_cache(None)
                self._update_gauges()

    async def _drop_batch(self, error: RouterError) -> None:
        """Abandons the calls in flight and fails every running and prefilling request."""
        await self._abandon_calls()
        prefills = self._queue.partly_prefilled()
        self._fail([*self._running.values(), *self._prefilling.values(), *prefills], error)
        self._running.clear()
        self._prefilling = {}

    async def _fail_everything(self, error: RouterError) -> None:
        await self._drop_batch(error)
        self._fail(self._queue.drain(), error)
        self._update_gauges()

    async def _give_up(self, error: ShardTimeoutError) -> None:
        logger.error("%s; failing every request", error)
        self.stuck = error
        await self._fail_everything(GenerationError(str(error)))
        self._stuck_event.set()

    def _next_batch(
        self, min_size: int | None, running: list[Entry] | None = None, take: bool = True
    ) -> list[Entry] | None:
        """The requests that may be prefilled beside `running` (default: every running request)
        now, taken from the queue unless `take` is False."""
        cfg = self.config
        running = list(self._running.values()) if running is None else running
        max_size = None if cfg.max_batch_size is None else max(cfg.max_batch_size - len(running), 0)
        used = sum(entry.budget_tokens for entry in running)
        entries = self._queue.next_batch(
            min_size,
            max_size,
            cfg.max_batch_prefill_tokens,
            cfg.max_batch_total_tokens - used,
            take,
        )
        self._metrics.queue_size.set(len(self._queue))
        return entries

    async def _serve(self, entries: list[Entry]) -> None:
        """Runs the batch until it is empty, one step ahead of the router: the next call is sent
        as soon as a step answers, then the router handles that step's generations while the
        shards compute. The next call is a Decode, or, when TGI's rule lets waiting requests
        join, a Prefill of those that carries the running batch (it decodes in the same pass)."""
        answered = _Answered()
        answered.add(*await self._prefilled(await self._send_prefill(entries)))
        waiting_steps = 1
        while answered.generations or answered.batches:
            call = None
            await self._release_cancelled_prefills()
            if answered.batches:
                on_shard = _request_ids(answered.batches)
                joining = self._joining(waiting_steps, on_shard)
                waiting_steps = 0 if joining else waiting_steps
                call = await (
                    self._send_prefill(joining, answered.batches)
                    if joining
                    else self._send_decode(
                        answered.batches, not self._join_likely_next(waiting_steps, on_shard)
                    )
                )
            self._handle(answered.generations)
            self._forget_ended(on_shard=_request_ids(answered.batches))
            answered = _Answered()
            if call is not None:
                step = self._prefilled(call) if call.method == "prefill" else self._decoded(call)
                answered.add(*await step)
                waiting_steps += 1

    def _join_min_size(self, waiting_steps: int, running: int) -> int | None:
        """TGI's rule: waiting requests join when enough of them wait, or they waited long."""
        if waiting_steps >= self.config.max_waiting_tokens:
            return None
        return math.floor(running * self.config.waiting_served_ratio)

    def _joining(self, waiting_steps: int, on_shard: set[int]) -> list[Entry] | None:
        """The requests that join the running batch now; asked before the last step's
        generations are handled, of the requests the shards still hold."""
        running = [entry for rid, entry in self._running.items() if rid in on_shard]
        min_size = self._join_min_size(waiting_steps, len(running))
        joining = self._next_batch(min_size, running)
        if joining:
            reason = "backpressure" if min_size is not None else "wait_exceeded"
            self._metrics.batch_concat.inc(reason=reason)
        return joining

    def _join_likely_next(self, waiting_steps: int, on_shard: set[int]) -> bool:
        """Whether requests may join at the next step: with one more step waited, beside the
        running requests that will not have reached their token limit. An end the router cannot
        foresee (EOS, a stop sequence) or a new arrival may still let some join; the shards
        then run the step launched ahead and the prefill apart."""
        staying = [
            entry
            for rid, entry in self._running.items()
            if rid in on_shard and not _may_reach_limit_next(entry)
        ]
        min_size = self._join_min_size(waiting_steps + 1, len(staying))
        return self._next_batch(min_size, staying, take=False) is not None

    async def _send_prefill(
        self, entries: list[Entry], running: Sequence[pb.CachedBatch] = ()
    ) -> _InFlight:
        now = time.monotonic()
        for entry in entries:
            if entry.batched_at is None:
                entry.batched_at = now
                self._metrics.request_queue_duration.observe(now - entry.queued_at)
        self._metrics.batch_next_size.observe(len(entries))
        self._prefilling = {entry.id: entry for entry in entries}  # failed by `_run` on a bug
        batch = pb.Batch(
            id=next(self._batch_ids),
            requests=[self._to_proto(entry) for entry in entries],
            size=len(entries),
            max_tokens=sum(entry.budget_tokens for entry in entries),
        )
        ids = [batch.id, *(cached.id for cached in running)]
        return await self._send("prefill", self._client.prefill(batch, running), ids)

    async def _prefilled(
        self, call: _InFlight
    ) -> tuple[list[pb.Generation], pb.CachedBatch | None]:
        """A Prefill's answer; one that carried the running batch answers for it too."""
        carried = len(call.batch_ids) > 1
        running = list(self._running.values()) if carried else []
        result = await self._receive(call, running + list(self._prefilling.values()))
        members, self._prefilling = self._prefilling, {}
        if result is None:
            if carried:
                self._running.clear()
            await self._drop_prefills([e for e in members.values() if e.prefilled or e.chunked])
            return [], None
        for request_id, entry in members.items():
            if not entry.chunked:
                self._running[request_id] = entry
            entry.prefilled += entry.chunk
        return result.generations, await self._filter(result.batch)

    async def _send_decode(self, batches: list[pb.CachedBatch], launch_next: bool) -> _InFlight:
        """`launch_next`: no request is expected to join at the next step, so the shards may
        launch it ahead (see the shard engine's `decode`)."""
        self._update_gauges()
        ids = [batch.id for batch in batches]
        return await self._send("decode", self._client.decode(batches, launch_next), ids)

    async def _decoded(self, call: _InFlight) -> tuple[list[pb.Generation], pb.CachedBatch | None]:
        result = await self._receive(call, list(self._running.values()))
        if result is None:
            self._running.clear()
            return [], None
        return result.generations, await self._filter(result.batch)

    async def _send(
        self, method: str, call: Coroutine[Any, Any, StepResult], batch_ids: list[int]
    ) -> _InFlight:
        """Starts a shard call and returns once its request is on its way."""
        self._metrics.batch_inference_count.inc(method=method)
        task = asyncio.ensure_future(_timed(call))
        self._in_flight.add(task)
        for _ in range(_YIELDS_TO_SEND):
            await asyncio.sleep(0)
        return _InFlight(method, task, batch_ids)

    async def _receive(self, call: _InFlight, entries: list[Entry]) -> StepResult | None:
        """The call's answer; on failure every entry of its batches gets a 424 error (past its
        deadline, the error goes up: the loop gives up)."""
        try:
            result, seconds = await call.task
        except Exception as error:
            self._metrics.batch_inference_failure.inc(method=call.method)
            if isinstance(error, ShardTimeoutError):
                raise
            logger.error("%s failed: %s", call.method, error, extra={"batch_ids": call.batch_ids})
            self._fail(entries, GenerationError(_describe(error)))
            for batch_id in call.batch_ids:
                await self._clear_cache(batch_id)
            return None
        finally:
            self._in_flight.discard(call.task)
        metrics = self._metrics
        metrics.batch_inference_success.inc(method=call.method)
        metrics.batch_inference_duration.labels(call.method).observe(seconds)
        metrics.batch_forward_duration.labels(call.method).observe(result.timings.forward)
        metrics.batch_decode_duration.labels(call.method).observe(result.timings.decode)
        return result

    async def _abandon_calls(self) -> None:
        calls, self._in_flight = self._in_flight, set()
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

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
            await self._clear_cache(cached.id)
            return None
        stopped = [ref for ref in stopped if ref.request_id in keep]
        if len(keep) == len(on_shard) and not stopped:
            return cached
        started = time.monotonic()
        filtered = await self._client.filter_batch(cached.id, sorted(keep), stopped)
        self._metrics.batch_filter_duration.labels("filter").observe(time.monotonic() - started)
        return filtered if filtered is not None and filtered.size else None

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
        await self._drop_prefills(cancelled)

    async def _drop_prefills(self, entries: list[Entry]) -> None:
        if not entries:
            return
        for entry in entries:
            entry.prefilled = 0  # the shards hold none of it now
        try:
            await self._client.drop_prefills([entry.id for entry in entries])
        except ShardTimeoutError:
            raise
        except Exception as error:
            logger.error("dropping partial prompts failed: %s", error)

    async def _clear_cache(self, batch_id: int | None) -> None:
        try:
            await self._client.clear_cache(batch_id)
        except ShardTimeoutError:
            raise
        except Exception as error:
            logger.error("clear_cache failed: %s", error, extra={"batch_id": batch_id})

    # ---- generations to events ---------------------------------------------------------------

    def _handle(self, generations: Iterable[pb.Generation]) -> None:
        for generation in generations:
            entry = self._running.get(generation.request_id)
            if entry is None or not entry.alive:
                continue
            if generation.beams:
                events = self._beam_events(entry, generation)
            else:
                events = self._events(entry, generation)
            for event in events:
                entry.events.put_nowait(event)
            finishes_one = events and events[-1].finished is not None
            if finishes_one and all(seq.done for seq in entry.sequences):
                entry.done = True
                self._record_success(entry)

    def _events(self, entry: Entry, generation: pb.Generation) -> list[StreamEvent]:
        index = generation.sequence_index
        seq = entry.sequences[index]
        if seq.done:
            return []
        events = []
        # Indexed once per token: iterating or re-reading protobuf fields costs µs per token.
        ids, logprobs = generation.tokens.ids, generation.tokens.logprobs
        count, top_tokens = len(ids), generation.top_tokens
        for position in range(count):
            is_last = position == count - 1
            shard_reason = _SHARD_FINISH_REASONS.get(generation.finish_reason) if is_last else None
            token, text, reason = self._next_token(
                seq, ids[position], logprobs[position], shard_reason
            )
            event = StreamEvent(
                index=len(seq.generated_ids), token=token, text=text, sequence_index=index
            )
            if position < len(top_tokens):
                event.top_tokens = self._tokens(top_tokens[position])
            if len(seq.generated_ids) == 1 and entry.request.decoder_input_details:
                event.prefill = self._tokens(generation.prefill_tokens)
            if reason is not None:
                event.finished = self._finish(entry, seq, reason, generation.seed)
                if generation.finish_reason == pb.FINISH_REASON_NONE:
                    self._stopped.append(pb.SequenceRef(request_id=entry.id, sequence_index=index))
            events.append(event)
            if reason is not None:
                break
        return events

    def _beam_events(self, entry: Entry, generation: pb.Generation) -> list[StreamEvent]:
        """The returned beams, best first, each as the events of one finished sequence."""
        events = []
        for index, beam in enumerate(generation.beams):
            beam_generation = pb.Generation(
                request_id=generation.request_id,
                sequence_index=index,
                prefill_tokens=generation.prefill_tokens,
                tokens=beam.tokens,
                finish_reason=beam.finish_reason,
            )
            events += self._events(entry, beam_generation)
        return events

    def _next_token(
        self, seq: SequenceOutput, token_id: int, logprob: float, reason: FinishReason | None
    ) -> tuple[Token, str, FinishReason | None]:
        """The token, the text it releases, and why the sequence finishes (if it does)."""
        seq.generated_ids.append(token_id)
        special = token_id in self._special_ids
        delta = seq.detokenizer.add(token_id)
        check = seq.stop_matcher.feed(delta)
        released = check.text
        if check.stopped:
            reason = FinishReason.STOP_SEQUENCE
        elif reason is not None:
            tail = seq.stop_matcher.feed(seq.detokenizer.flush())
            released += tail.text if tail.stopped else tail.text + seq.stop_matcher.flush()
            reason = FinishReason.STOP_SEQUENCE if tail.stopped else reason
        seq.text.append(released)
        text = self._token_text(token_id) if special else delta
        token = Token(id=token_id, text=text, logprob=_logprob(logprob), special=special)
        return token, released, reason

    def _finish(
        self, entry: Entry, seq: SequenceOutput, reason: FinishReason, seed: int
    ) -> Finished:
        seq.done = True
        return Finished(
            reason=reason,
            generated_text="".join(seq.text),
            generated_tokens=len(seq.generated_ids),
            input_length=entry.request.input_length,
            seed=None if entry.request.params.greedy else seed,
        )

    def _token_text(self, token_id: int) -> str:
        """One token's own text, through the fast tokenizer itself (the transformers wrapper
        costs ~20x more per call, and this runs per streamed and per prompt token)."""
        return self._backend_tokenizer.decode([token_id], skip_special_tokens=False)

    def _tokens(self, tokens: pb.Tokens) -> list[Token]:
        return [
            Token(
                id=token_id,
                text=self._token_text(token_id),
                logprob=_logprob(logprob),
                special=token_id in self._special_ids,
            )
            for token_id, logprob in zip(tokens.ids, tokens.logprobs, strict=False)
        ]

    def _to_proto(self, entry: Entry) -> pb.Request:
        request = entry.request
        chooser, stopping = request.params.to_proto(request.max_new_tokens)
        return pb.Request(
            id=entry.id,
            input_ids=request.input_ids,
            prefix_len=entry.prefilled,
            chunk_len=entry.chunk if entry.chunked else 0,
            decoder_input_details=request.decoder_input_details,
            parameters=chooser,
            stopping_parameters=stopping,
            top_n_tokens=request.top_n_tokens,
            num_sequences=request.params.num_sequences,
            beam_search=request.params.beam_search_proto(),
        )

    # ---- bookkeeping -------------------------------------------------------------------------

    def _fail(self, entries: Iterable[Entry], error: BaseException) -> None:
        for entry in entries:
            if entry.alive:
                entry.done = True
                entry.events.put_nowait(error)

    def _record_success(self, entry: Entry) -> None:
        metrics = self._metrics
        inference = time.monotonic() - (entry.batched_at or entry.queued_at)
        generated = entry.generated_tokens
        metrics.request_inference_duration.observe(inference)
        metrics.request_mean_time_per_token_duration.observe(inference / max(generated, 1))
        metrics.request_generated_tokens.observe(generated)

    def _update_gauges(self) -> None:
        self._metrics.batch_current_size.set(len(self._running))
        self._metrics.batch_current_max_tokens.set(
            sum(entry.budget_tokens for entry in self._running.values())
        )
        self._metrics.queue_size.set(len(self._queue))


async def _timed(call: Coroutine[Any, Any, StepResult]) -> tuple[StepResult, float]:
    started = time.monotonic()
    result = await call
    return result, time.monotonic() - started


def _may_reach_limit_next(entry: Entry) -> bool:
    """Whether the step being sent may give a request its last allowed token: the router has
    not handled the step before it yet, hence two tokens to come."""
    generated = max(len(sequence.generated_ids) for sequence in entry.sequences)
    return generated + 2 >= entry.request.max_new_tokens


def _request_ids(batches: Iterable[pb.CachedBatch]) -> set[int]:
    return {request_id for batch in batches for request_id in batch.request_ids}


def _returned(request: ValidRequest) -> int:
    """Sequences the request answers with: every sample (the caller picks the best), or the
    n best beams."""
    params = request.params
    return params.n if params.use_beam_search else params.num_sequences


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) else value


def _describe(error: BaseException) -> str:
    details = getattr(error, "details", None)
    return str(details() if callable(details) else error) or type(error).__name__
