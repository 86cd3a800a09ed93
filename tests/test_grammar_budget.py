"""Grammars that cannot hurt the server: compiled off the event loop in worker processes killed
at the time budget, refused past the size budget, cached (refusals too), and never compiled on
a shard. Hostile grammars go to a router over the real tiny-model shard while victim streams
run beside them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable

import pytest
from transformers import AutoTokenizer

from shardline.proto import generate_pb2 as pb
from shardline.router.errors import ValidationError
from shardline.router.grammar_compiler import GrammarBudget, GrammarCompiler, build_vocabulary
from shardline.router.grammar_worker import InvalidGrammarError, compile_index
from shardline.router.validation import ValidationLimits, Validator
from shardline.sampling_params import SamplingParams
from tests.router_fixtures import open_router

BUDGET_S = 1.0
BOMB = r"\w{1,2000}"  # outlines-core needs ~5 s for its DFA alone, minutes over a vocabulary
BAD_PATTERN = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(a"}}}
VICTIMS = 4
VICTIM_TOKENS = 64
MAX_LOOP_LAG_S = 0.3  # generous; a compile on the loop would stall it for the whole budget


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
async def compiler(tokenizer):
    grammars = GrammarCompiler(tokenizer, [tokenizer.eos_token_id], GrammarBudget(BUDGET_S))
    yield grammars
    grammars.close()


@pytest.fixture
async def router(shard_socket, tiny_llama_dir):
    budget = GrammarBudget(timeout_s=BUDGET_S)
    async with open_router(
        shard_socket, tiny_llama_dir, max_total_tokens=256, grammar_budget=budget
    ) as client:
        yield client


class LoopLag:
    """The longest the event loop went without running this ticker."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s = period_s
        self.worst_s = 0.0
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.period_s)
            self.worst_s = max(self.worst_s, time.monotonic() - before - self.period_s)

    def stop(self) -> float:
        self._task.cancel()
        return self.worst_s


async def _victim(router, index: int) -> dict:
    parameters = {"max_new_tokens": VICTIM_TOKENS, "ignore_eos": True, "details": True}
    body = {"inputs": f"the river {index}", "parameters": parameters}
    answer = await router.post("/generate_stream", json=body)
    assert answer.status == 200
    events = [json.loads(line[5:]) for line in (await answer.text()).splitlines() if line]
    return events[-1]


async def _victims_until(router, index: int, until: asyncio.Event) -> list[dict]:
    """Victim streams one after another until `until`: one is streaming at any time."""
    finished = [await _victim(router, index)]
    while not until.is_set():
        finished.append(await _victim(router, index))
    return finished


async def _health_latencies(router, until: asyncio.Event) -> list[float]:
    latencies = []
    while not until.is_set():
        started = time.monotonic()
        assert (await router.get("/health")).status == 200
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.05)
    return latencies


async def _beside_victims(router, hostile: Awaitable) -> tuple[object, list[dict], list[float]]:
    """`hostile`'s answer while victim streams and /health probes run; the loop lag is
    asserted throughout."""
    lag = LoopLag()
    answered = asyncio.Event()
    victims = asyncio.gather(*(_victims_until(router, i, answered) for i in range(VICTIMS)))
    probes = asyncio.ensure_future(_health_latencies(router, answered))
    await asyncio.sleep(0.2)  # the victims are streaming
    answer = await hostile
    answered.set()
    finished = [event for stream in await victims for event in stream]
    latencies = await probes
    assert lag.stop() < MAX_LOOP_LAG_S
    return answer, finished, latencies


def _all_finished(victims: list[dict]) -> None:
    for event in victims:
        assert event["details"]["finish_reason"] == "length", event
        assert event["details"]["generated_tokens"] == VICTIM_TOKENS


async def _generate(router, grammar: dict) -> tuple[int, dict, float]:
    started = time.monotonic()
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 3, "grammar": grammar}}
    answer = await router.post("/generate", json=body)
    return answer.status, await answer.json(), time.monotonic() - started


async def test_a_regex_bomb_is_refused_within_the_budget_and_harms_no_one(router):
    bomb = _generate(router, {"type": "regex", "value": BOMB})
    (status, body, seconds), victims, health = await _beside_victims(router, bomb)
    assert status == 422, body
    assert body["error_type"] == "validation"
    assert "takes longer than 1 s to compile" in body["error"]
    assert seconds < BUDGET_S + 5.0  # a worker's start (the first grammar) plus the budget
    _all_finished(victims)
    assert health and max(health) < 1.0
    status, body, seconds = await _generate(router, {"type": "regex", "value": BOMB})
    assert (status, seconds < 0.5) == (422, True), "the refusal is cached"


async def test_an_uncompilable_schema_pattern_is_refused_and_harms_no_one(router):
    refusal = _generate(router, {"type": "json", "value": BAD_PATTERN})
    (status, body, _), victims, _ = await _beside_victims(router, refusal)
    assert status == 422, body
    assert body["error_type"] == "validation"
    assert "`guided_json` does not compile" in body["error"]
    _all_finished(victims)


async def test_a_normal_grammar_still_constrains_after_a_bomb(router):
    assert (await _generate(router, {"type": "regex", "value": BOMB}))[0] == 422
    status, body, _ = await _generate(router, {"type": "regex", "value": "(yes|no)"})
    assert status == 200, body
    assert body["generated_text"] in ("yes", "no", "ye", "y", "n")


async def test_a_repeated_grammar_is_compiled_once(compiler):
    regex = (pb.GRAMMAR_TYPE_REGEX, "[a-z]{1,8}")
    first, second = await asyncio.gather(compiler.compile(*regex), compiler.compile(*regex))
    assert first == second and first
    assert await compiler.compile(*regex) == first
    assert compiler.compilations == 1


async def test_a_refusal_is_remembered(compiler):
    bad = (pb.GRAMMAR_TYPE_REGEX, "[a-")
    for _ in range(3):
        with pytest.raises(ValidationError, match="`guided_regex` does not compile"):
            await compiler.compile(*bad)
    assert compiler.compilations == 1


async def test_a_killed_worker_is_replaced(compiler):
    started = time.monotonic()
    with pytest.raises(ValidationError, match="takes longer than"):
        await compiler.compile(pb.GRAMMAR_TYPE_REGEX, BOMB)
    assert time.monotonic() - started < BUDGET_S + 5.0
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}})
    assert await compiler.compile(pb.GRAMMAR_TYPE_JSON, schema)


def test_past_the_size_budget_is_refused(tokenizer):
    vocabulary = build_vocabulary(tokenizer, (tokenizer.eos_token_id,))
    index = compile_index(pb.GRAMMAR_TYPE_REGEX, "[a-z ]{1,20}", vocabulary, 1 << 30)
    with pytest.raises(InvalidGrammarError, match="--max-grammar-bytes"):
        compile_index(pb.GRAMMAR_TYPE_REGEX, "[a-z ]{1,20}", vocabulary, len(index) - 1)


async def test_without_grammar_support_a_grammar_is_refused(tokenizer):
    limits = ValidationLimits(max_input_tokens=64, max_total_tokens=128, vocab_size=512)
    validator = Validator(tokenizer, limits, grammars=None)
    try:
        with pytest.raises(ValidationError, match="grammar is not supported"):
            await validator.validate("the city", SamplingParams(guided_regex="[a-z]+"))
        assert (await validator.validate("the city", SamplingParams())).grammar_index == b""
    finally:
        validator.close()
