"""The `paced` scheduling policy (router/paced_admission.py): how many waiting requests are let
into the queue at once, and in which order; driven by the router's batcher over a fake shard,
through the server's flags, and through the offline `LLM` (whose default it is)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from benchmarks.offline_floor import StepLog
from shardline.launcher.args import parse_args
from shardline.launcher.commands import router_spec
from shardline.llm import _engine_args
from shardline.router.batcher import BatchingConfig
from shardline.router.cli import build_parser as router_parser
from shardline.router.cli import settings_from_args
from shardline.router.errors import IncompleteGenerationError
from shardline.router.paced_admission import pace_limit
from shardline.sampling_params import SamplingParams
from tests.batcher_helpers import _batcher, _counting_script, _request
from tests.fake_shard import FakeShardClient, router_client
from tests.shard_harness import random_prompts


def test_pace_limit_spreads_the_tokens_left_over_the_longest_chain():
    assert pace_limit(1000, 100) == 15  # 1.5 x 10 rows per step
    assert pace_limit(1000, 100, factor=1.0) == 10
    assert pace_limit(0, 0) == 1
    assert pace_limit(5, 100) == 1


class _CountingShard(FakeShardClient):
    """Records the most requests it held at once."""

    most_at_once = 0

    async def decode(self, batches, launch_next=False):
        self.most_at_once = max(self.most_at_once, self.num_sequences)
        return await super().decode(batches, launch_next)


def _paced(tokenizer, step_delay: float = 0.0, **config):
    fake = _CountingShard(_counting_script, tokenizer.eos_token_id, step_delay)
    return fake, _batcher(tokenizer, fake, scheduling_policy="paced", **config)


async def test_the_longest_request_goes_first_and_the_short_ones_fill_its_steps(tokenizer):
    # 40 + 20 x 5 = 140 tokens over 40 steps: 3.5 rows a step, 1.5 x that = 6 at once
    fake, batcher = _paced(tokenizer)
    short = [_request(tokenizer, f"short {i}", max_new_tokens=5) for i in range(20)]
    long = _request(tokenizer, "the long one", max_new_tokens=40)
    streams = [batcher.submit(request) for request in [*short[:10], long, *short[10:]]]
    results = await asyncio.gather(*(stream.collect() for stream in streams))
    assert [len(events) for events in results] == [5] * 10 + [40] + [5] * 10
    assert fake.calls_of("prefill")[0][2][0] == 10  # the long request's id: first in
    assert fake.most_at_once == pace_limit(140, 40) == 6
    assert len(fake.calls_of("decode")) + len(fake.calls_of("prefill")) <= 45
    await batcher.stop()


async def test_first_come_first_served_lets_every_request_in_at_once(tokenizer):
    fake = _CountingShard(_counting_script, tokenizer.eos_token_id)
    batcher = _batcher(tokenizer, fake, waiting_served_ratio=0.0)
    requests = [_request(tokenizer, f"short {i}", max_new_tokens=5) for i in range(20)]
    requests.insert(10, _request(tokenizer, "the long one", max_new_tokens=40))
    await asyncio.gather(*(batcher.submit(r).collect() for r in requests))
    assert fake.calls_of("prefill")[0][2][0] == 0 and fake.most_at_once == 21
    await batcher.stop()


async def test_an_early_end_lets_the_rest_in(tokenizer):
    # 60 + 30 x 2 tokens over 60 steps: three at a time, until the long one ends at its EOS
    # (its script's 12th token) and the limit is worked out again over what is left
    script = _counting_script(tokenizer.encode("the long one"))
    eos_after = script[11]
    fake = _CountingShard(_counting_script, eos_after)
    batcher = _batcher(tokenizer, fake, scheduling_policy="paced")
    long = batcher.submit(_request(tokenizer, "the long one", max_new_tokens=60))
    others = [batcher.submit(_request(tokenizer, f"x{i}", max_new_tokens=2)) for i in range(30)]
    assert len(await long.collect()) == 12
    await asyncio.gather(*(stream.collect() for stream in others))
    assert pace_limit(60 + 30 * 2, 60) == 3 and fake.most_at_once > 3
    await batcher.stop()


async def test_a_request_cancelled_while_held_never_reaches_the_shards(tokenizer):
    # 40 + 5 + 5 tokens over 40 steps: two at once, the third held
    fake, batcher = _paced(tokenizer, step_delay=0.005)
    long = batcher.submit(_request(tokenizer, "the long one", max_new_tokens=40))
    first = batcher.submit(_request(tokenizer, "let in", max_new_tokens=5))
    held = batcher.submit(_request(tokenizer, "held back", max_new_tokens=5))
    while not fake.calls_of("prefill"):
        await asyncio.sleep(0.001)
    assert pace_limit(50, 40) == 2 and batcher.queue_size == 1
    held.cancel()
    assert [len(await stream.collect()) for stream in (long, first)] == [40, 5]
    assert [call[2] for call in fake.calls_of("prefill")] == [[0, 1]]
    assert fake.num_sequences == 0 and batcher.queue_size == 0
    await batcher.stop()


async def test_stopping_fails_the_held_requests_too(tokenizer):
    fake, batcher = _paced(tokenizer, step_delay=0.01)
    streams = [
        batcher.submit(_request(tokenizer, text, max_new_tokens=n))
        for text, n in (("the long one", 40), ("let in", 5), ("held back", 5))
    ]
    await asyncio.sleep(0.02)
    assert batcher.queue_size == 1
    await batcher.stop()
    for stream in streams:
        with pytest.raises(IncompleteGenerationError):
            await stream.collect()


async def test_a_paced_server_holds_a_burst_back_beside_a_long_request(tokenizer):
    fake = _CountingShard(_counting_script, tokenizer.eos_token_id, step_delay=0.01)
    client, _ = await router_client(fake, tokenizer, scheduling_policy="paced")

    async def generate(n: int) -> int:
        body = {"inputs": "the city", "parameters": {"max_new_tokens": n, "details": True}}
        response = await client.post("/generate", json=body)
        assert response.status == 200
        return (await response.json())["details"]["generated_tokens"]

    try:
        long = asyncio.ensure_future(generate(30))
        while not fake.calls_of("prefill"):
            await asyncio.sleep(0.001)
        # 30 + 16 x 3 tokens left over 30 steps: 4 at once (up to 6 if the burst comes 10 steps
        # late), where arrival order would run all 17
        assert await asyncio.gather(*(generate(3) for _ in range(16))) == [3] * 16
        assert await long == 30
    finally:
        await client.close()
    assert 4 <= fake.most_at_once <= 6


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="'lifo' is not one of"):
        BatchingConfig(100, 1000, scheduling_policy="lifo")
    with pytest.raises(ValueError, match="'priority' is not one of"):
        _engine_args({"scheduling_policy": "priority"})  # vLLM's other policy, before any load


def test_the_launchers_scheduling_policy_reaches_the_routers_batching(tmp_path: Path):
    environ = {"CUDA_VISIBLE_DEVICES": "", "SCHEDULING_POLICY": "paced"}
    argv = router_spec(parse_args([], environ), tmp_path, "/s", {"PATH": os.environ["PATH"]})
    routed = router_parser().parse_args(["--tokenizer-name", "t", *argv.argv[1:]])
    assert settings_from_args(routed).scheduling_policy == "paced"
    default = router_spec(parse_args([], {"CUDA_VISIBLE_DEVICES": ""}), tmp_path, "/s", {})
    assert (
        router_parser().parse_args(["--tokenizer-name", "t", *default.argv[1:]]).scheduling_policy
        == "fcfs"
    )


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
    assert [o.request_id for o in outputs] == [str(i) for i in range(13)]
    assert [len(o.outputs[0].token_ids) for o in outputs] == lengths
    assert max(call.decode_rows for call in log.calls) <= pace_limit(sum(lengths), 24) == 3
