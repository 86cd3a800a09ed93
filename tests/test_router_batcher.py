"""The batching core, driven directly (no HTTP): budgets, joining, filtering, cancellation, failing
joins and chunked prefill."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from shardline.proto import generate_pb2 as pb
from shardline.router.client import StepResult
from shardline.router.errors import GenerationError, IncompleteGenerationError
from shardline.router.request_types import FinishReason, ValidRequest
from shardline.sampling_params import SamplingParams
from tests.batcher_helpers import RecordingShard, _batcher, _counting_script, _request
from tests.fake_shard import FakeShardClient


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


class FailingJoinShard(RecordingShard):
    """Fails the Prefill that carries the running batch."""

    async def prefill(
        self,
        batch: pb.Batch,
        cached_batches: Sequence[pb.CachedBatch] = (),
        launch_next: bool = False,
    ) -> StepResult:
        if cached_batches:
            raise RuntimeError("CUDA error during prefill")
        return await super().prefill(batch, cached_batches, launch_next)


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


class _OneSequenceShard(FakeShardClient):
    """Generates only the first sequence of every request, whatever its num_sequences."""

    async def prefill(self, batch, cached_batches=(), launch_next=False):
        for request in batch.requests:
            request.num_sequences = 1
        return await super().prefill(batch, cached_batches, launch_next)


async def test_a_request_the_shards_drop_unfinished_fails_instead_of_hanging(tokenizer):
    fake = _OneSequenceShard(_counting_script, tokenizer.eos_token_id)
    batcher = _batcher(tokenizer, fake)
    request = ValidRequest(
        inputs="the city",
        input_ids=tokenizer.encode("the city"),
        params=SamplingParams(n=2, seed=1),
        max_new_tokens=5,
    )
    dropped = batcher.submit(request)
    bystander = batcher.submit(_request(tokenizer, "the model", max_new_tokens=8))
    with pytest.raises(IncompleteGenerationError, match="dropped"):
        await asyncio.wait_for(dropped.collect(), 5)
    assert len(await asyncio.wait_for(bystander.collect(), 5)) == 8
    assert batcher.running_size == 0 and fake.num_sequences == 0
    await batcher.stop()
