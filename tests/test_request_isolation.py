"""One hostile request harms no one: it gets a 4xx in TGI's error JSON, alone, and the requests
beside it finish as if it never came. Through the routes on the real tiny-model shard, and at
each later line of defence: the batcher (a request it cannot encode, one a shard refuses) and
the shard (a bad entry in a Prefill is refused, the others run, nothing leaks)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from shardline.proto import generate_pb2 as pb
from shardline.router.errors import ValidationError
from shardline.shards.engine import ShardEngine
from tests.batcher_helpers import _batcher, _counting_script, _request
from tests.fake_shard import FakeShardClient
from tests.router_fixtures import open_router
from tests.shard_harness import (
    Arrival,
    make_request,
    random_prompts,
    run_schedule,
    transformers_greedy,
)
from tests.test_engine import assert_no_leaks, warmed_engine

LONE_SURROGATE = "\ud800"
VICTIMS = 5
VICTIM_TOKENS = 24
VICTIM_BODY = {
    "inputs": "the model server",
    "parameters": {"max_new_tokens": VICTIM_TOKENS, "ignore_eos": True, "details": True},
}
COMPLETION = {"prompt": "Hi", "max_tokens": 3}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}

# (route, JSON body as text: Python's json writes a lone surrogate as "\ud800", and reads NaN
# and Infinity, which are no JSON).
HOSTILE = {
    "generate stop surrogate": ("/generate", {"inputs": "Hi", "parameters": {"stop": ["\ud800"]}}),
    "generate inputs surrogate": ("/generate", {"inputs": f"Hi {LONE_SURROGATE}"}),
    "generate top_k 2^64": ("/generate", {"inputs": "Hi", "parameters": {"top_k": 2**64}}),
    "generate seed 2^64": ("/generate", {"inputs": "Hi", "parameters": {"seed": 2**64}}),
    "generate NaN temperature": (
        "/generate",
        {"inputs": "Hi", "parameters": {"temperature": math.nan}},
    ),
    "generate Infinity temperature": (
        "/generate",
        {"inputs": "Hi", "parameters": {"temperature": math.inf}},
    ),
    "generate float32-overflowing temperature": (
        "/generate",
        {"inputs": "Hi", "parameters": {"temperature": 1e300}},
    ),
    "generate float32-underflowing repetition_penalty": (
        "/generate",
        {"inputs": "Hi", "parameters": {"repetition_penalty": 1e-300}},
    ),
    "generate stop_token_ids 2^32": (
        "/generate",
        {"inputs": "Hi", "parameters": {"stop_token_ids": [2**32]}},
    ),
    "generate regex grammar surrogate": (
        "/generate",
        {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": LONE_SURROGATE}}},
    ),
    "generate max_new_tokens 2^64": (
        "/generate",
        {"inputs": "Hi", "parameters": {"max_new_tokens": 2**64}},
    ),
    "generate truncate 2^64": ("/generate", {"inputs": "Hi", "parameters": {"truncate": 2**64}}),
    "generate best_of 2^64": (
        "/generate",
        {"inputs": "Hi", "parameters": {"best_of": 2**64, "do_sample": True}},
    ),
    "generate top_n_tokens 2^64": (
        "/generate",
        {"inputs": "Hi", "parameters": {"top_n_tokens": 2**64}},
    ),
    "completions stop surrogate": ("/v1/completions", {**COMPLETION, "stop": [LONE_SURROGATE]}),
    "completions top_k 2^64": ("/v1/completions", {**COMPLETION, "top_k": 2**64}),
    "completions seed 2^64": ("/v1/completions", {**COMPLETION, "seed": 2**64}),
    "completions NaN temperature": ("/v1/completions", {**COMPLETION, "temperature": math.nan}),
    "completions Infinity top_p": ("/v1/completions", {**COMPLETION, "top_p": math.inf}),
    "completions max_tokens 2^32": ("/v1/completions", {**COMPLETION, "max_tokens": 2**32}),
    "completions min_tokens 2^64": ("/v1/completions", {**COMPLETION, "min_tokens": 2**64}),
    "completions stop_token_ids 2^32": (
        "/v1/completions",
        {**COMPLETION, "stop_token_ids": [2**32]},
    ),
    "completions prompt surrogate": ("/v1/completions", {**COMPLETION, "prompt": LONE_SURROGATE}),
    "completions empty cache_salt": ("/v1/completions", {**COMPLETION, "cache_salt": ""}),
    "chat cache_salt surrogate": ("/v1/chat/completions", {**CHAT, "cache_salt": LONE_SURROGATE}),
    "chat cache_salt number": ("/v1/chat/completions", {**CHAT, "cache_salt": 7}),
    "generate empty cache_salt": ("/generate", {"inputs": "Hi", "parameters": {"cache_salt": ""}}),
    "completions logit_bias id 2^40": (
        "/v1/completions",
        {**COMPLETION, "logit_bias": {"1099511627776": 1}},
    ),
    "completions logit_bias 1e300": ("/v1/completions", {**COMPLETION, "logit_bias": {"5": 1e300}}),
    "chat n 2^64": ("/v1/chat/completions", {**CHAT, "n": 2**64}),
    "chat top_logprobs 2^64": (
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 2**64},
    ),
    "chat stop surrogate": ("/v1/chat/completions", {**CHAT, "stop": [LONE_SURROGATE]}),
    "chat top_k 2^64": ("/v1/chat/completions", {**CHAT, "top_k": 2**64}),
    "chat seed 2^64": ("/v1/chat/completions", {**CHAT, "seed": 2**64}),
    "chat NaN temperature": ("/v1/chat/completions", {**CHAT, "temperature": math.nan}),
    "chat message surrogate": (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": LONE_SURROGATE}]},
    ),
    "chat tool description surrogate": (
        "/v1/chat/completions",
        {
            **CHAT,
            "tools": [{**TOOL, "function": {**TOOL["function"], "description": LONE_SURROGATE}}],
        },
    ),
    "chat tool schema surrogate": (
        "/v1/chat/completions",
        {
            **CHAT,
            "tools": [
                {
                    **TOOL,
                    "function": {
                        **TOOL["function"],
                        "parameters": {"type": "object", "properties": {LONE_SURROGATE: {}}},
                    },
                }
            ],
        },
    ),
}


# Valid extremes: answered normally, beside the same victims.
SAMPLED = {"inputs": "Hi", "parameters": {"max_new_tokens": 6, "do_sample": True, "details": True}}
EXTREME = {
    "seed 2^64-1 and top_k 2^32-1": {"seed": 2**64 - 1, "top_k": 2**32 - 1},
    "largest float32 temperature": {"temperature": 3.4e38},
    "smallest float32 repetition penalty": {"repetition_penalty": 1e-38},
    "largest float32 repetition penalty": {"repetition_penalty": 3.4e38},
    "tiny top_p and typical_p": {"top_p": 1e-30, "typical_p": 1e-30},
    "min_p 1": {"min_p": 1.0},
}


async def _victim(client, started: asyncio.Event) -> dict:
    """A greedy /generate_stream; its events, the last with the details."""
    events = []
    async with client.post("/generate_stream", json=VICTIM_BODY) as answer:
        assert answer.status == 200
        async for line in answer.content:
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
                started.set()
    return events[-1]


@pytest.fixture(scope="module")
def victim_text(shard_socket: str, tiny_llama_dir: Path) -> str:
    """The victims' text when nothing hostile runs beside them."""

    async def generate() -> str:
        async with open_router(shard_socket, tiny_llama_dir, max_total_tokens=128) as client:
            answer = await client.post("/generate", json=VICTIM_BODY)
            return (await answer.json())["generated_text"]

    return asyncio.run(generate())


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_request_fails_alone(
    case: str, victim_text: str, shard_socket: str, tiny_llama_dir: Path
):
    route, body = HOSTILE[case]
    async with open_router(shard_socket, tiny_llama_dir, max_total_tokens=128) as client:
        started = [asyncio.Event() for _ in range(VICTIMS)]
        victims = [asyncio.create_task(_victim(client, event)) for event in started]
        await asyncio.gather(*(event.wait() for event in started))  # all mid-generation
        answer = await client.post(
            route, data=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        error = await answer.json()
        assert 400 <= answer.status < 500, error
        assert set(error) == {"error", "error_type"}, error
        finished = await asyncio.wait_for(asyncio.gather(*victims), 60)
        healthy = await client.get("/health")
        assert healthy.status == 200
    for last in finished:
        assert last["details"]["generated_tokens"] == VICTIM_TOKENS
        assert last["details"]["finish_reason"] == "length"
        assert last["generated_text"] == victim_text


@pytest.mark.parametrize("case", list(EXTREME))
async def test_extreme_valid_values_run_beside_others(
    case: str, victim_text: str, shard_socket: str, tiny_llama_dir: Path
):
    body = {**SAMPLED, "parameters": {**SAMPLED["parameters"], **EXTREME[case]}}
    async with open_router(shard_socket, tiny_llama_dir, max_total_tokens=128) as client:
        started = [asyncio.Event() for _ in range(VICTIMS)]
        victims = [asyncio.create_task(_victim(client, event)) for event in started]
        await asyncio.gather(*(event.wait() for event in started))
        answer = await client.post("/generate", json=body)
        assert answer.status == 200, await answer.text()
        assert (await answer.json())["details"]["generated_tokens"] >= 1
        finished = await asyncio.wait_for(asyncio.gather(*victims), 60)
    assert [last["generated_text"] for last in finished] == [victim_text] * VICTIMS


# ---- the batcher, over a fake shard -------------------------------------------------------------


async def test_a_request_the_shards_refuse_fails_alone(tokenizer):
    refused_tokens = 7

    def refuse(request: pb.Request) -> str | None:
        bad = request.stopping_parameters.max_new_tokens == refused_tokens
        return "request 1: temperature nan is out of range" if bad else None

    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id, step_delay=0.002)
    fake.refuse = refuse
    batcher = _batcher(tokenizer, fake)
    victims = [_request(tokenizer, f"the city {i}", max_new_tokens=12) for i in range(VICTIMS)]
    streams = [batcher.submit(request) for request in victims]
    first = [await stream.__anext__() for stream in streams]  # the victims run
    hostile = batcher.submit(_request(tokenizer, "the model", max_new_tokens=refused_tokens))
    with pytest.raises(ValidationError, match="temperature nan"):
        await hostile.collect()
    for request, head, stream in zip(victims, first, streams, strict=True):
        events = [head, *await stream.collect()]
        assert [e.token.id for e in events] == _counting_script(request.input_ids)[:12]
        assert events[-1].finished is not None
    assert fake.num_sequences == 0 and not fake.batches
    await batcher.stop()


async def test_a_request_that_cannot_be_encoded_fails_alone(tokenizer):
    """Past validation (here bypassed), the batcher drops the request whose shard message
    does not build, not the batch it would have joined."""
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id, step_delay=0.002)
    batcher = _batcher(tokenizer, fake)
    victims = [_request(tokenizer, f"the city {i}", max_new_tokens=12) for i in range(VICTIMS)]
    streams = [batcher.submit(request) for request in victims]
    first = [await stream.__anext__() for stream in streams]
    bad = _request(tokenizer, "the model", max_new_tokens=4)
    bad.params.guided_regex = LONE_SURROGATE
    too_wide = _request(tokenizer, "the model", max_new_tokens=4)
    too_wide.params.top_k = 2**64
    for hostile in (bad, too_wide):
        with pytest.raises(ValidationError, match="cannot be sent"):
            await batcher.submit(hostile).collect()
    for request, head, stream in zip(victims, first, streams, strict=True):
        events = [head, *await stream.collect()]
        assert [e.token.id for e in events] == _counting_script(request.input_ids)[:12]
    assert fake.num_sequences == 0 and not fake.batches
    await batcher.stop()


# ---- the shard ----------------------------------------------------------------------------------


def _nan_temperature(request: pb.Request) -> None:
    request.parameters.do_sample = True
    request.parameters.temperature = math.nan


def _infinite_penalty(request: pb.Request) -> None:
    request.parameters.repetition_penalty = math.inf


def _grammar_without_index(request: pb.Request) -> None:
    request.parameters.grammar_type = pb.GRAMMAR_TYPE_REGEX
    request.parameters.grammar = "(unclosed"


def _damaged_grammar_index(request: pb.Request) -> None:
    _grammar_without_index(request)
    request.parameters.grammar_index = b"not an outlines-core index"


def _outside_vocabulary(request: pb.Request) -> None:
    request.input_ids.append(10**6)


def _too_long(request: pb.Request) -> None:
    request.stopping_parameters.max_new_tokens = 10**6


SPOILERS: dict[str, Callable[[pb.Request], None]] = {
    "NaN temperature": _nan_temperature,
    "infinite repetition penalty": _infinite_penalty,
    "grammar without its compiled index": _grammar_without_index,
    "damaged grammar index": _damaged_grammar_index,
    "token outside the vocabulary": _outside_vocabulary,
    "more positions than the model has": _too_long,
}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> ShardEngine:
    return warmed_engine(tiny_llama_dir)


def _recording(engine: ShardEngine, refused: list[int]):
    def prefill(request: pb.PrefillRequest) -> pb.PrefillResponse:
        answer = engine.prefill(request)
        refused.extend(r.request_id for r in answer.refused)
        return answer

    return prefill


@pytest.mark.parametrize("spoil", list(SPOILERS))
@pytest.mark.parametrize("mixed", [False, True])
def test_a_bad_prefill_entry_is_refused_and_the_others_run(
    spoil: str, mixed: bool, engine: ShardEngine, tiny_llama_dir: Path
):
    """Request 1 is bad: alone in its Prefill when `mixed` (the running batch it would carry
    decodes all the same), or beside requests 0 and 2 at once otherwise."""
    prompts = random_prompts(3, engine.config.vocab_size, seed=21)
    requests = [make_request(i, prompt, 8) for i, prompt in enumerate(prompts)]
    SPOILERS[spoil](requests[1])
    steps = [0, 2, 3] if mixed else [0, 0, 0]
    refused: list[int] = []
    result = run_schedule(
        _recording(engine, refused),
        engine.decode,
        [Arrival(step, request) for step, request in zip(steps, requests, strict=True)],
        launch_next=mixed,
        mixed=mixed,
    )
    assert refused == [1]
    expected = transformers_greedy(tiny_llama_dir, [prompts[0], prompts[2]], [8, 8])
    assert [result.tokens[0], result.tokens[2]] == expected
    assert 1 not in result.tokens
    assert_no_leaks(engine)


def test_a_refused_continuation_drops_its_partial_prompt(engine: ShardEngine):
    """A chunked prompt whose later chunk is refused leaves nothing behind on the shard."""
    prompt = random_prompts(1, engine.config.vocab_size, seed=22, min_len=12, max_len=12)[0]
    first = make_request(5, prompt, 4, chunk_len=6)
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=40, requests=[first])))
    assert not answer.refused and engine.stats().free_blocks < engine.stats().total_blocks
    rest = make_request(5, prompt, 4, prefix_len=6)
    _nan_temperature(rest)
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=41, requests=[rest])))
    assert [r.request_id for r in answer.refused] == [5]
    assert "temperature" in answer.refused[0].reason
    assert_no_leaks(engine)
