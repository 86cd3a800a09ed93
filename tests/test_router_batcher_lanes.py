"""Several batches in flight (pipeline parallelism, `batches_in_flight`): one's step is sent while
another's runs, each request keeps its own tokens, the batches share the token budget, a prompt
in chunks goes one chunk at a time, and what the router ends leaves its own batch."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tests.batcher_helpers import _batcher, _counting_script, _request
from tests.fake_shard import FakeShardClient


@dataclass
class InFlightShard(FakeShardClient):
    """Counts the steps it runs at once, and the sequences it holds when each starts."""

    steps: int = 0
    most_steps: int = 0
    most_sequences: int = 0

    async def _work(self, method: str) -> None:
        self.steps += 1
        self.most_steps = max(self.most_steps, self.steps)
        self.most_sequences = max(self.most_sequences, self.num_sequences)
        try:
            await super()._work(method)
        finally:
            self.steps -= 1


def _texts(tokenizer, count: int) -> list[str]:
    words = ["the city", "north", "a river", "model server", "blue", "the house", "cats", "ok"]
    return [words[i % len(words)] + " x" * (i // len(words)) for i in range(count)]


@pytest.mark.parametrize("depth", [1, 2])
async def test_two_batches_are_in_flight_at_once_each_with_its_own_tokens(tokenizer, depth):
    fake = InFlightShard(_counting_script, tokenizer.eos_token_id, step_delay=0.003)
    batcher = _batcher(tokenizer, fake, max_batch_size=3, batches_in_flight=depth)
    requests = [_request(tokenizer, t, 3 + i % 5) for i, t in enumerate(_texts(tokenizer, 9))]
    results = await asyncio.gather(*(batcher.submit(r).collect() for r in requests))
    for request, events in zip(requests, results, strict=True):
        expected = _counting_script(request.input_ids)[: request.max_new_tokens]
        assert [e.token.id for e in events] == expected
    overlapped = batcher._metrics.batch_steps_overlapped.value()
    assert fake.most_steps == depth
    assert (overlapped > 0) == (depth == 2)
    assert fake.num_sequences == 0 and batcher.running_size == 0
    await batcher.stop()


async def test_the_batches_share_the_total_token_budget(tokenizer):
    fake = InFlightShard(_counting_script, tokenizer.eos_token_id, step_delay=0.003)
    request = _request(tokenizer, "the model server", max_new_tokens=6)
    per_request = request.budget_tokens(1)
    budget = {"max_batch_total_tokens": 4 * per_request + 1, "max_batch_size": 3}
    batcher = _batcher(tokenizer, fake, batches_in_flight=2, **budget)
    results = await asyncio.gather(*(batcher.submit(request).collect() for _ in range(10)))
    assert all(len(events) == 6 for events in results)
    assert fake.most_steps == 2  # a second batch took what the first left of the budget
    assert fake.most_sequences <= 4
    await batcher.stop()


async def test_a_prompt_in_chunks_goes_one_chunk_at_a_time(tokenizer):
    """While one batch's Prefill carries a chunk (the prompt stays first in the queue), the
    other batch takes nothing from the queue: each chunk is sent once, in order."""
    fake = InFlightShard(
        _counting_script, tokenizer.eos_token_id, step_delay=0.003, support_chunking=True
    )
    chunking = {"max_batch_prefill_tokens": 8, "prefill_chunking": True}
    batcher = _batcher(tokenizer, fake, batches_in_flight=2, max_batch_size=3, **chunking)
    short = [_request(tokenizer, t, 12) for t in _texts(tokenizer, 3)]
    long = _request(tokenizer, " ".join(["model"] * 30), max_new_tokens=4)
    streams = [batcher.submit(r) for r in short[:2]]
    await asyncio.sleep(0.01)
    streams += [batcher.submit(long), batcher.submit(short[2])]
    results = await asyncio.gather(*(stream.collect() for stream in streams))
    for request, events in zip([*short[:2], long, short[2]], results, strict=True):
        expected = _counting_script(request.input_ids)[: request.max_new_tokens]
        assert [e.token.id for e in events] == expected
    chunks = [chunk for calls in fake.chunks for chunk in calls if chunk[0] == 2]
    length = long.input_length
    assert chunks == [(2, s, 8 if s + 8 < length else 0) for s in range(0, length, 8)]
    assert fake.most_steps == 2
    assert fake.num_sequences == 0 and not fake.partial
    await batcher.stop()


async def test_what_the_router_ends_leaves_its_own_batch(tokenizer):
    text = " the café naïve model"
    ids = tokenizer.encode(text, add_special_tokens=False) * 8
    fake = InFlightShard(lambda prompt: ids, tokenizer.eos_token_id, step_delay=0.003)
    batcher = _batcher(tokenizer, fake, batches_in_flight=2, max_batch_size=2)
    long = [batcher.submit(_request(tokenizer, "x", max_new_tokens=30)) for _ in range(3)]
    stopped = batcher.submit(_request(tokenizer, "y", max_new_tokens=30, stop=["ïve m"]))
    cancelled = batcher.submit(_request(tokenizer, "z", max_new_tokens=30))
    await anext(cancelled)
    cancelled.cancel()
    stop_events = await stopped.collect()
    assert stop_events[-1].finished.generated_text == " the café na"
    lens = [len(e) for e in await asyncio.gather(*(s.collect() for s in long))]
    assert lens == [30] * 3
    assert fake.most_steps == 2
    for _ in range(100):
        if fake.num_sequences == 0 and batcher.running_size == 0:
            break
        await asyncio.sleep(0.005)
    assert fake.num_sequences == 0 and batcher.running_size == 0
    await batcher.stop()
