"""The offline run's pace (shardline/offline_pacing.py): how many requests are let in at once,
driven by a stand-in batcher that generates one token per running request per step."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from benchmarks.offline_floor import StepLog
from shardline.offline_pacing import pace_limit, submitted_at_pace
from shardline.sampling_params import SamplingParams
from tests.shard_harness import random_prompts


def test_pace_limit_spreads_the_tokens_left_over_the_longest_chain():
    assert pace_limit(1000, 100) == 15  # 1.5 x 10 rows per step
    assert pace_limit(1000, 100, factor=1.0) == 10
    assert pace_limit(0, 0) == 1
    assert pace_limit(5, 100) == 1


@dataclass
class _Request:
    max_new_tokens: int
    ends_after: int = 0  # an EOS before max_new_tokens, if set
    params: SamplingParams = field(default_factory=SamplingParams)

    @property
    def length(self) -> int:
        return self.ends_after or self.max_new_tokens


@dataclass
class _Entry:
    sequences: list = field(default_factory=lambda: [None])
    generated_tokens: int = 0


@dataclass
class _Stream:
    request: _Request
    entry: _Entry = field(default_factory=_Entry)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class _StepBatcher:
    """Runs every submitted request one token per step until its length."""

    def __init__(self) -> None:
        self.running: list[_Stream] = []
        self.most_at_once = 0

    def submit(self, request: _Request) -> _Stream:
        stream = _Stream(request)
        self.running.append(stream)
        self.most_at_once = max(self.most_at_once, len(self.running))
        return stream

    async def steps(self) -> None:
        while True:
            await asyncio.sleep(0)
            for stream in self.running:
                stream.entry.generated_tokens += 1
                if stream.entry.generated_tokens == stream.request.length:
                    stream.done.set()
            self.running = [s for s in self.running if not s.done.is_set()]


def _run(requests: list[_Request], consume=None) -> tuple[list, _StepBatcher]:
    async def finished(position: int, stream: _Stream) -> int:
        await stream.done.wait()
        return position

    async def main():
        batcher = _StepBatcher()
        stepping = asyncio.create_task(batcher.steps())
        try:
            return await submitted_at_pace(batcher, requests, consume or finished), batcher
        finally:
            stepping.cancel()

    return asyncio.run(main())


def test_short_requests_are_spread_over_the_longest_ones_steps():
    lengths = [100] + [10] * 40  # 500 tokens over 100 steps: 5 rows a step, 7.5 paced
    results, batcher = _run([_Request(n) for n in lengths])
    assert results == list(range(len(lengths)))  # every one, in the order given
    assert batcher.most_at_once == pace_limit(sum(lengths), 100) == 8


def test_a_request_ending_before_its_limit_lets_the_rest_in():
    # 1,150 tokens over 1,000 steps: two at a time, until the first ends at EOS after 5 steps
    # and the other 30 (150 tokens over 5 steps) all go in together
    requests = [_Request(1000, ends_after=5)] + [_Request(5) for _ in range(30)]
    assert pace_limit(1000 + 30 * 5, 1000) == 2
    _, batcher = _run(requests)
    assert batcher.most_at_once >= 25


def test_the_first_error_ends_the_run_and_cancels_the_rest():
    cancelled = []

    async def consume(position: int, stream: _Stream) -> int:
        try:
            await stream.done.wait()
        except asyncio.CancelledError:
            cancelled.append(position)
            raise
        if position == 3:
            raise ValueError("request 3 failed")
        return position

    with pytest.raises(ValueError, match="request 3"):
        _run([_Request(n) for n in (50, 40, 30, 5, 5, 5)], consume)
    assert 0 in cancelled


def test_llm_generate_runs_at_the_pace_and_keeps_every_answer(llm):
    """Through the real LLM: one request of 24 tokens and 12 of 2 (48 tokens over 24 steps: at
    most ceil(1.5 x 2) = 3 at once); the engine never decodes more than three rows, and every
    answer is the one the prompt gets alone, in the prompts' order."""
    prompts = random_prompts(13, 384, seed=71, min_len=3, max_len=12)
    lengths = [2] * 6 + [24] + [2] * 6
    params = [
        SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True) for n in lengths
    ]
    alone = [
        llm.generate(prompt_token_ids=[p], sampling_params=sp, use_tqdm=False)[0]
        for p, sp in zip(prompts, params, strict=True)
    ]
    log = StepLog.attach(llm._shards.engine)
    try:
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    finally:
        log.detach()
    assert [o.outputs[0].token_ids for o in outputs] == [a.outputs[0].token_ids for a in alone]
    assert [len(o.outputs[0].token_ids) for o in outputs] == lengths
    assert max(call.decode_rows for call in log.calls) <= pace_limit(sum(lengths), 24) == 3
