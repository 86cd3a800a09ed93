"""The batching core, driven directly (no HTTP): budgets, joining, filtering, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from shardline.router.batcher import Batcher, BatchingConfig
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
    assert any(len(call[1]) == 2 for call in fake.calls_of("decode")), "no concatenation"
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
