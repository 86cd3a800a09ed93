"""The batching core, driven directly (no HTTP): one step ahead, the router's work on step N
overlaps the shards' step N+1, over a fake shard and over gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from shardline.proto import generate_pb2 as pb
from shardline.proto import generate_pb2_grpc
from shardline.router.batcher import Batcher
from shardline.router.client import ShardedClient, StepResult
from shardline.router.request_types import FinishReason
from shardline.shard_answers import decode_response, prefill_response
from tests.batcher_helpers import RecordingShard, _batcher, _counting_script, _request
from tests.fake_shard import FakeShardClient


def _log_events(batcher: Batcher, log: list[str]) -> None:
    """Logs the tokens of each step as the batcher turns them into events."""
    lane = batcher._lanes[0]
    handle = lane._handle

    def logged(generations) -> None:
        log.append("events " + ",".join(str(n) for n in generations.generated_tokens))
        handle(generations)

    lane._handle = logged


async def test_decode_n_plus_1_is_sent_before_step_n_events_are_made(tokenizer):
    fake = RecordingShard(_counting_script, tokenizer.eos_token_id, step_delay=0.002)
    batcher = _batcher(tokenizer, fake)
    _log_events(batcher, fake.log)
    stream = batcher.submit(_request(tokenizer, "the city", max_new_tokens=5))
    events = await stream.collect()
    # prefill answers token 1, decode k token k + 1; the shard ends the request at decode 4
    assert fake.log == [*(e for k in range(1, 5) for e in ("decode", f"events {k}")), "events 5"]
    assert [e.token.id for e in events] == _counting_script(stream.request.input_ids)[:5]
    assert fake.num_sequences == 0
    await batcher.stop()


async def test_joining_requests_prefill_with_the_running_batch_in_one_call(tokenizer):
    fake = RecordingShard(_counting_script, tokenizer.eos_token_id, step_delay=0.005)
    batcher = _batcher(tokenizer, fake, waiting_served_ratio=0.0)
    first = asyncio.create_task(
        batcher.submit(_request(tokenizer, "the city", max_new_tokens=30)).collect()
    )
    await asyncio.sleep(0.05)
    late = await batcher.submit(_request(tokenizer, "north", max_new_tokens=3)).collect()
    assert [e.token.id for e in late] == _counting_script(tokenizer.encode("north"))[:3]
    assert fake.prefills_during_decode == [False, False]
    (first_batch, *_), (joined, *_) = [call[1:] for call in fake.calls_of("prefill")]
    assert fake.carried == [(joined, [first_batch])]
    decodes = [call[1] for call in fake.calls_of("decode")]
    assert all(ids == [first_batch] for ids in decodes)
    assert len(await first) == 30
    # the join's Prefill, with nothing left waiting, lets the shards launch the next step
    assert fake.prefill_launch_next == [False, True]
    assert fake.num_sequences == 0
    await batcher.stop()


class PausingShard(RecordingShard):
    """Holds its 5th decode until `resume` is set, so a test can queue a request meanwhile,
    once the router has long moved on to wait for the answer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.paused, self.resume = asyncio.Event(), asyncio.Event()

    async def decode(
        self, batches: Sequence[pb.CachedBatch], launch_next: bool = False
    ) -> StepResult:
        if len(self.launch_next) == 4:
            await asyncio.sleep(0.05)
            self.paused.set()
            await self.resume.wait()
        return await super().decode(batches, launch_next)


async def test_decodes_ask_for_the_next_step_ahead_when_nothing_waits(tokenizer):
    fake = PausingShard(_counting_script, tokenizer.eos_token_id)
    batcher = _batcher(tokenizer, fake, waiting_served_ratio=0.0)
    first = asyncio.create_task(
        batcher.submit(_request(tokenizer, "the city", max_new_tokens=12)).collect()
    )
    await fake.paused.wait()
    late = batcher.submit(_request(tokenizer, "north", max_new_tokens=3))
    fake.resume.set()
    await late.collect()
    await first
    await batcher.stop()
    kinds = [call[0] for call in fake.calls if call[0] in ("decode", "prefill")]
    assert kinds[:7] == ["prefill"] + ["decode"] * 5 + ["prefill"]
    # "north" joined by the call after it came; only the last decode (its rows' last token,
    # nothing going on after it) asked for no step ahead.
    assert all(fake.launch_next[:-1]) and not fake.launch_next[-1]
    assert len(fake.launch_next) >= 9
    assert len(fake.carried) == 1


async def test_a_decode_asks_for_the_next_step_ahead_unless_every_row_may_end_with_it(
    tokenizer,
):
    fake = RecordingShard(_counting_script, tokenizer.eos_token_id)
    batcher = _batcher(tokenizer, fake, max_batch_size=1)
    first = batcher.submit(_request(tokenizer, "the city", max_new_tokens=6))
    second = batcher.submit(_request(tokenizer, "north", max_new_tokens=6))
    await asyncio.gather(first.collect(), second.collect())
    await batcher.stop()
    # Decode 5 of each request gives its last token: no step is launched behind it, so
    # "north", waiting for the one row, is not queued behind a step no row wants.
    assert fake.launch_next == ([True] * 4 + [False]) * 2
    assert fake.carried == []


async def test_decodes_run_ahead_while_a_request_waits_to_join_and_it_prefills_behind_them(
    tokenizer,
):
    fake = RecordingShard(_counting_script, tokenizer.eos_token_id, step_delay=0.002)
    batcher = _batcher(tokenizer, fake, waiting_served_ratio=2.0, max_waiting_tokens=5)
    first = batcher.submit(_request(tokenizer, "the city", max_new_tokens=30))
    await anext(first)
    late = batcher.submit(_request(tokenizer, "north", max_new_tokens=3))
    first_events, late_events = await asyncio.gather(first.collect(), late.collect())
    await batcher.stop()
    # One waiter is less than twice the running one: "north" joins once it waited 5 steps;
    # every decode before and after that join asks for its next step ahead but the last.
    assert fake.launch_next == [True] * (len(fake.launch_next) - 1) + [False]
    assert len(fake.carried) == 1 and fake.prefill_launch_next == [False, True]
    assert [e.token.id for e in late_events] == _counting_script(tokenizer.encode("north"))[:3]
    assert len(first_events) == 29 and fake.num_sequences == 0


async def test_a_stop_sequence_ends_the_request_with_no_extra_token(tokenizer):
    words = " the café naïve model server is fast"
    ids = tokenizer.encode(words, add_special_tokens=False) + [tokenizer.eos_token_id]
    fake = RecordingShard(lambda prompt: ids, tokenizer.eos_token_id, step_delay=0.001)
    batcher = _batcher(tokenizer, fake)
    stopped = batcher.submit(_request(tokenizer, "x", max_new_tokens=30, stop=["naïve"]))
    other = batcher.submit(_request(tokenizer, "y", max_new_tokens=30))
    stopped_events, other_events = await asyncio.gather(stopped.collect(), other.collect())
    finished = stopped_events[-1].finished
    assert finished.reason is FinishReason.STOP_SEQUENCE
    assert finished.generated_text == " the café "
    assert "".join(e.text for e in stopped_events) == finished.generated_text
    needed = next(n for n in range(1, len(ids)) if "naïve" in tokenizer.decode(ids[:n]))
    assert [e.token.id for e in stopped_events] == ids[:needed]
    assert finished.generated_tokens == needed
    # the shards ran it one step more; that token was dropped, then the row filtered out
    batch_id, (stopped_id, other_id), _ = fake.calls_of("prefill")[0][1:]
    assert fake.tokens[stopped_id] == needed + 1
    assert ("filter", batch_id, [other_id]) in fake.calls
    assert other_events[-1].finished.generated_text == words
    assert fake.num_sequences == 0
    await batcher.stop()


async def test_a_cancelled_request_gets_no_event_and_leaves_at_the_next_answer(tokenizer):
    fake = RecordingShard(_counting_script, tokenizer.eos_token_id, step_delay=0.003)
    batcher = _batcher(tokenizer, fake)
    cancelled = batcher.submit(_request(tokenizer, "the city", max_new_tokens=40))
    other = batcher.submit(_request(tokenizer, "the river", max_new_tokens=20))
    other_events = asyncio.create_task(other.collect())
    for _ in range(3):
        await anext(cancelled)
    cancelled.cancel()
    calls_at_cancel = len(fake.calls)
    assert len(await other_events) == 20
    after = [call for call in fake.calls[calls_at_cancel:] if call[0] in ("decode", "filter")]
    prefill = fake.calls_of("prefill")[0]
    assert after[0] == ("filter", prefill[1], [prefill[2][1]])
    assert cancelled._entry.events.empty()
    assert fake.num_sequences == 0 and batcher.running_size == 0
    await batcher.stop()


class _FakeShardServicer(generate_pb2_grpc.TextGenerationServiceServicer):
    """A fake shard behind real gRPC, answering on a server thread while the router's thread
    is busy; logs when each Decode arrives."""

    def __init__(self, fake: FakeShardClient, log: list[str]) -> None:
        self._fake = fake
        self._log = log
        self._loop = asyncio.new_event_loop()

    def Prefill(self, request, context):
        result = self._loop.run_until_complete(
            self._fake.prefill(request.batch, request.cached_batches)
        )
        return prefill_response(result)

    def Decode(self, request, context):
        self._log.append("decode")
        result = self._loop.run_until_complete(self._fake.decode(request.batches))
        return decode_response(result)

    def ClearCache(self, request, context):
        self._loop.run_until_complete(self._fake.clear_cache(request.id))
        return pb.ClearCacheResponse()


async def test_over_grpc_decode_n_plus_1_reaches_the_shard_before_step_n_is_handled(
    tokenizer, tmp_path
):
    log: list[str] = []
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id)
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(
        _FakeShardServicer(fake, log), server
    )
    socket = f"unix://{tmp_path}/shard"
    server.add_insecure_port(socket)
    server.start()
    client = ShardedClient([socket])
    batcher = _batcher(tokenizer, client)
    lane = batcher._lanes[0]
    handle = lane._handle

    def slow_handle(generations) -> None:
        time.sleep(0.05)  # the router's work on a step, holding the event loop
        handle(generations)
        log.append("handled")

    lane._handle = slow_handle
    try:
        events = await batcher.submit(_request(tokenizer, "the city", max_new_tokens=4)).collect()
    finally:
        await batcher.stop()
        await client.close()
        server.stop(grace=None)
    assert len(events) == 4
    assert log == ["decode", "handled"] * 3 + ["handled"]
