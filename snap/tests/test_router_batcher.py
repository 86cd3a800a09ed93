"""The batching core, driven directly (no HTTP): budgets, joining, filtering, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from shardline.proto import generate_pb2 as pb
from shardline.proto import generate_pb2_grpc
from shardline.router.batcher import Batcher, BatchingConfig
from shardline.router.client import ShardedClient, StepResult
from shardline.router.errors import GenerationError
from shardline.router.request_types import FinishReason, ValidRequest
from shardline.sampling_params import SamplingParams
from tests.test_router_fakes import FakeShardClient, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("router-tokenizer"))


def _counting_script(prompt: list[int]) -> list[int]:
    """Continues with ids derived from the prompt, so every request's output is its own."""
    return [(prompt[-1] + step + 10) % 300 + 10 for step in range(64)]


def _request(tokenizer, text: str, max_new_tokens: int, **params) -> ValidRequest:
    return ValidRequest(
        inputs=text,
        input_ids=tokenizer.encode(text),
        params=SamplingParams(temperature=0.0, **params),
        max_new_tokens=max_new_tokens,
    )


def _batcher(tokenizer, fake: FakeShardClient, **config) -> Batcher:
    settings = {"max_batch_prefill_tokens": 4096, "max_batch_total_tokens": 100_000, **config}
    batcher = Batcher(fake, tokenizer, BatchingConfig(**settings))
    batcher.start()
    return batcher


async def test_a_request_streams_every_token_then_finishes(tokenizer):
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id)
    batcher = _batcher(tokenizer, fake)
    request = _request(tokenizer, "the city", max_new_tokens=5)
    events = await batcher.submit(request).collect()
    assert [e.index for e in events] == [1, 2, 3, 4, 5]
    assert [e.token.id for e in events] == _counting_script(request.input_ids)[:5]
    assert events[-1].finished.reason is FinishReason.LENGTH
    assert all(e.finished is None for e in events[:-1])
    assert fake.num_sequences == 0
    await batcher.stop()


async def test_prefill_batches_respect_the_token_budgets(tokenizer):
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id, step_delay=0.002)
    # each request budgets input + 8 new tokens; 3 fit the total budget at once
    request = _request(tokenizer, "the model server", max_new_tokens=8)
    per_request = request.input_length + 8
    batcher = _batcher(tokenizer, fake, max_batch_total_tokens=3 * per_request + 1)
    streams = [batcher.submit(request) for _ in range(7)]
    results = await asyncio.gather(*(s.collect() for s in streams))
    assert all(len(events) == 8 for events in results)
    for _, _, ids, max_tokens in fake.calls_of("prefill"):
        assert len(ids) <= 3 and max_tokens <= 3 * per_request + 1
    assert max(len(call[2]) for call in fake.calls_of("prefill")) == 3
    assert fake.num_sequences == 0 and not fake.batches
    await batcher.stop()


async def test_prefill_budget_and_max_batch_size(tokenizer):
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id)
    request = _request(tokenizer, "the model server", max_new_tokens=4)
    batcher = _batcher(
        tokenizer, fake, max_batch_prefill_tokens=2 * request.input_length, max_batch_size=3
    )
    await asyncio.gather(*(batcher.submit(request).collect() for _ in range(6)))
    sizes = [len(call[2]) for call in fake.calls_of("prefill")]
    assert max(sizes) == 2 and sum(sizes) == 6
    await batcher.stop()


async def test_waiting_requests_join_the_running_batch(tokenizer):
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id, step_delay=0.005)
    batcher = _batcher(tokenizer, fake, waiting_served_ratio=0.0)
    first = batcher.submit(_request(tokenizer, "the city", max_new_tokens=30))
    first_events = asyncio.create_task(first.collect())
    await asyncio.sleep(0.05)
    late = await batcher.submit(_request(tokenizer, "north", max_new_tokens=3)).collect()
    assert len(late) == 3
    first_batch = fake.calls_of("prefill")[0][1]
    assert [running for _, running in fake.carried] == [[first_batch]], "no join"
    assert len(await first_events) == 30
    # the short one finished first and was filtered out of the running batch
    assert fake.calls_of("filter")
    assert fake.num_sequences == 0
    await batcher.stop()


async def test_finished_requests_are_filtered_out_at_once(tokenizer):
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id)
    batcher = _batcher(tokenizer, fake)
    short = batcher.submit(_request(tokenizer, "the city", max_new_tokens=2))
    long = batcher.submit(_request(tokenizer, "the river", max_new_tokens=6))
    await asyncio.gather(short.collect(), long.collect())
    prefill = fake.calls_of("prefill")[0]
    # after the decode step where `short` finished, only `long` is kept
    assert fake.calls_of("filter") == [("filter", prefill[1], [prefill[2][1]])]
    await batcher.stop()


async def test_cancel_drops_the_request_and_frees_its_sequence(tokenizer):
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id, step_delay=0.005)
    batcher = _batcher(tokenizer, fake)
    stream = batcher.submit(_request(tokenizer, "the city", max_new_tokens=60))
    await anext(stream)
    stream.cancel()
    for _ in range(100):
        if fake.num_sequences == 0 and batcher.running_size == 0:
            break
        await asyncio.sleep(0.005)
    assert fake.num_sequences == 0 and batcher.running_size == 0
    assert fake.calls_of("clear")
    await batcher.stop()


async def test_stop_sequence_finishes_and_trims_text(tokenizer):
    text = " the café naïve model"
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    fake = FakeShardClient(lambda prompt: ids, tokenizer.eos_token_id)
    batcher = _batcher(tokenizer, fake)
    events = await batcher.submit(
        _request(tokenizer, "x", max_new_tokens=30, stop=["ïve m"])
    ).collect()
    assert events[-1].finished.reason is FinishReason.STOP_SEQUENCE
    assert events[-1].finished.generated_text == " the café na"
    assert fake.num_sequences == 0
    await batcher.stop()


async def test_shard_failure_fails_the_batch_and_the_loop_goes_on(tokenizer):
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id, fail_on="decode")
    batcher = _batcher(tokenizer, fake)
    with pytest.raises(GenerationError, match="CUDA error"):
        await batcher.submit(_request(tokenizer, "the city", max_new_tokens=4)).collect()
    assert fake.calls_of("clear")
    fake.fail_on = None
    events = await batcher.submit(_request(tokenizer, "the city", max_new_tokens=4)).collect()
    assert len(events) == 4
    await batcher.stop()


# ---- one step ahead: the router's work on step N overlaps the shards' step N+1 -----------------


class RecordingShard(FakeShardClient):
    """Logs each decode, counts the tokens it answers per request, and tells whether each
    prefill was sent while a decode ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[str] = []
        self.decoding = 0
        self.prefills_during_decode: list[bool] = []
        self.tokens: dict[int, int] = {}
        self.launch_next: list[bool] = []

    async def decode(
        self, batches: Sequence[pb.CachedBatch], launch_next: bool = False
    ) -> StepResult:
        self.log.append("decode")
        self.launch_next.append(launch_next)
        self.decoding += 1
        try:
            result = await super().decode(batches, launch_next)
        finally:
            self.decoding -= 1
        for generation in result.generations:
            self.tokens[generation.request_id] = generation.generated_tokens
        return result

    async def prefill(
        self, batch: pb.Batch, cached_batches: Sequence[pb.CachedBatch] = ()
    ) -> StepResult:
        self.prefills_during_decode.append(self.decoding > 0)
        return await super().prefill(batch, cached_batches)


def _log_events(batcher: Batcher, log: list[str]) -> None:
    """Logs the tokens of each step as the batcher turns them into events."""
    handle = batcher._handle

    def logged(generations) -> None:
        generations = list(generations)
        log.append("events " + ",".join(str(g.generated_tokens) for g in generations))
        handle(generations)

    batcher._handle = logged


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
    # Nothing waited when the decodes were sent; "north" joined by the next call.
    assert all(fake.launch_next) and len(fake.launch_next) >= 9
    assert len(fake.carried) == 1


async def test_a_decode_asks_for_the_next_step_ahead_unless_a_request_may_join_then(tokenizer):
    fake = RecordingShard(_counting_script, tokenizer.eos_token_id)
    batcher = _batcher(tokenizer, fake, max_batch_size=1)
    first = batcher.submit(_request(tokenizer, "the city", max_new_tokens=6))
    second = batcher.submit(_request(tokenizer, "north", max_new_tokens=6))
    await asyncio.gather(first.collect(), second.collect())
    await batcher.stop()
    # "north" waits for the one row: no join can follow decodes 1-4 of "the city"; decode 5
    # gives its last token, so "north" may join after it. Then "north" runs alone.
    assert fake.launch_next == [True] * 4 + [False] + [True] * 5
    assert fake.carried == []


async def test_a_request_waiting_for_more_waiters_lets_decodes_run_ahead_until_it_may_join(
    tokenizer,
):
    fake = RecordingShard(_counting_script, tokenizer.eos_token_id, step_delay=0.002)
    batcher = _batcher(tokenizer, fake, waiting_served_ratio=2.0, max_waiting_tokens=5)
    first = batcher.submit(_request(tokenizer, "the city", max_new_tokens=30))
    await anext(first)
    late = batcher.submit(_request(tokenizer, "north", max_new_tokens=3))
    await asyncio.gather(first.collect(), late.collect())
    await batcher.stop()
    # One waiter is less than twice the running one: "north" joins once it waited 5 steps,
    # and only the decode before that join is sent without asking for a step ahead.
    before_join = fake.launch_next[: fake.launch_next.index(False) + 1]
    assert fake.launch_next.count(False) == 1 and len(fake.carried) == 1
    assert len(before_join) >= 3


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
        return pb.PrefillResponse(generations=result.generations, batch=result.batch)

    def Decode(self, request, context):
        self._log.append("decode")
        result = self._loop.run_until_complete(self._fake.decode(request.batches))
        return pb.DecodeResponse(generations=result.generations, batch=result.batch)

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
    handle = batcher._handle

    def slow_handle(generations) -> None:
        time.sleep(0.05)  # the router's work on a step, holding the event loop
        handle(generations)
        log.append("handled")

    batcher._handle = slow_handle
    try:
        events = await batcher.submit(_request(tokenizer, "the city", max_new_tokens=4)).collect()
    finally:
        await batcher.stop()
        await client.close()
        server.stop(grace=None)
    assert len(events) == 4
    assert log == ["decode", "handled"] * 3 + ["handled"]


class FailingJoinShard(RecordingShard):
    """Fails the Prefill that carries the running batch."""

    async def prefill(
        self, batch: pb.Batch, cached_batches: Sequence[pb.CachedBatch] = ()
    ) -> StepResult:
        if cached_batches:
            raise RuntimeError("CUDA error during prefill")
        return await super().prefill(batch, cached_batches)


async def test_a_failing_join_fails_the_running_and_joining_requests_and_the_loop_goes_on(
    tokenizer,
):
    fake = FailingJoinShard(_counting_script, tokenizer.eos_token_id, step_delay=0.005)
    batcher = _batcher(tokenizer, fake, waiting_served_ratio=0.0)
    running = batcher.submit(_request(tokenizer, "the city", max_new_tokens=30))
    await anext(running)
    joining = batcher.submit(_request(tokenizer, "north", max_new_tokens=6))
    for stream in (running, joining):
        with pytest.raises(GenerationError, match="CUDA error during prefill"):
            await stream.collect()
    assert fake.num_sequences == 0 and batcher.running_size == 0
    events = await batcher.submit(_request(tokenizer, "the city", max_new_tokens=4)).collect()
    assert len(events) == 4
    await batcher.stop()


def _long_request(tokenizer, words: int, max_new_tokens: int) -> ValidRequest:
    return _request(tokenizer, " ".join(["model"] * words), max_new_tokens)


async def test_long_prompts_are_prefilled_in_chunks_beside_running_requests(tokenizer):
    """With shards that chunk, a prompt over the prefill budget joins with the part that fits;
    the rest follows a chunk a step, each beside the running batch, which keeps decoding."""
    fake = FakeShardClient(
        _counting_script, tokenizer.eos_token_id, step_delay=0.005, support_chunking=True
    )
    batcher = _batcher(tokenizer, fake, max_batch_prefill_tokens=8, prefill_chunking=True)
    running = batcher.submit(_request(tokenizer, "the city", max_new_tokens=40))
    await asyncio.sleep(0.02)
    long = _long_request(tokenizer, 20, max_new_tokens=3)
    events, long_events = await asyncio.gather(running.collect(), batcher.submit(long).collect())
    assert len(events) == 40
    assert [e.token.id for e in long_events] == _counting_script(long.input_ids)[:3]
    chunks = [chunk for calls in fake.chunks for chunk in calls if chunk[0] == 1]
    length = long.input_length
    starts = list(range(0, length, 8))
    assert chunks == [(1, s, 8 if s + 8 < length else 0) for s in starts]
    assert len(fake.carried) >= len(starts) - 1  # the chunks ran beside the running batch
    assert fake.num_sequences == 0 and not fake.partial
    await batcher.stop()


async def test_a_prompt_over_the_budget_waits_without_chunking(tokenizer):
    """Shards that do not chunk get whole prompts only: one that does not fit is never cut."""
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id)
    batcher = _batcher(tokenizer, fake, max_batch_prefill_tokens=8)
    stream = batcher.submit(_long_request(tokenizer, 20, max_new_tokens=3))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(stream.collect(), 0.2)
    assert not fake.calls_of("prefill")
    await batcher.stop()


async def test_a_cancelled_partial_prompt_is_dropped_on_the_shards(tokenizer):
    fake = FakeShardClient(
        _counting_script, tokenizer.eos_token_id, step_delay=0.05, support_chunking=True
    )
    batcher = _batcher(tokenizer, fake, max_batch_prefill_tokens=8, prefill_chunking=True)
    running = batcher.submit(_request(tokenizer, "the city", max_new_tokens=10))
    long = batcher.submit(_long_request(tokenizer, 40, max_new_tokens=3))
    while not fake.partial:
        await asyncio.sleep(0.01)
    long.cancel()
    assert len(await running.collect()) == 10
    assert fake.calls_of("drop_prefills") == [("drop_prefills", [1])]
    assert not fake.partial and fake.num_sequences == 0
    chunks_of_long = [chunk for calls in fake.chunks for chunk in calls if chunk[0] == 1]
    assert len(chunks_of_long) < 5  # the rest of its prompt was never sent
    await batcher.stop()
