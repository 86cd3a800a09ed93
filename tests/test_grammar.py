"""Constrained decoding (TGI's `grammar`, vLLM's guided_json / guided_regex) on the tiny model.

The engine tests attach the compiled index as the router does (`_compiled`); the budget, the
cache and hostile grammars are tests/test_grammar_budget.py's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from transformers import AutoTokenizer

from shardline.guided_decoding import JSON_OBJECT_SCHEMA
from shardline.proto import generate_pb2 as pb
from shardline.router.grammar_compiler import build_vocabulary
from shardline.router.grammar_worker import compile_index
from shardline.sampling_params import SamplingParams, SamplingParamsError
from shardline.shards.engine import ShardEngine
from tests.router_fixtures import open_router, openai_client
from tests.shard_harness import Arrival, make_request, random_prompts, run_schedule
from tests.test_engine import assert_no_leaks, warmed_engine

REGEX = r"(north|south) [0-9]{2,4}( [a-z]{1,6}){0,3}"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age"],
}
MAX_NEW = 64


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> ShardEngine:
    return warmed_engine(tiny_llama_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def vocabulary(engine, tokenizer):
    return build_vocabulary(tokenizer, tuple(sorted(engine.config.eos_token_ids)))


def _params(sample: bool, seed: int = 0, **grammar: object) -> SamplingParams:
    return SamplingParams(temperature=1.0 if sample else 0.0, seed=seed, **grammar)


def _compiled(request: pb.Request, vocabulary) -> pb.Request:
    """The request with its grammar's index, as the router sends it."""
    params = request.parameters
    if params.grammar_type != pb.GRAMMAR_TYPE_NONE:
        params.grammar_index = compile_index(
            params.grammar_type, params.grammar, vocabulary, 1 << 30
        )
    return request


def _request(vocabulary, request_id: int, prompt: list[int], max_new: int, params) -> pb.Request:
    return _compiled(make_request(request_id, prompt, max_new, params), vocabulary)


def _run(engine: ShardEngine, requests: list[pb.Request]) -> dict[int, list[int]]:
    result = run_schedule(engine.prefill, engine.decode, [Arrival(0, r) for r in requests])
    for request in requests:
        assert result.finish_reasons[request.id] == pb.FINISH_REASON_EOS_TOKEN, request.id
    assert_no_leaks(engine)
    return result.tokens


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("sample", [False, True])
def test_regex_output_matches_the_regex(engine, tokenizer, vocabulary, sample):
    prompts = random_prompts(4, engine.config.vocab_size, seed=5)
    params = [_params(sample, seed=i, guided_regex=REGEX) for i in range(4)]
    requests = [_request(vocabulary, i, p, MAX_NEW, params[i]) for i, p in enumerate(prompts)]
    for tokens in _run(engine, requests).values():
        assert tokens[-1] in engine.config.eos_token_ids
        assert re.fullmatch(REGEX, _text(tokenizer, tokens)), _text(tokenizer, tokens)


@pytest.mark.parametrize("sample", [False, True])
def test_json_output_validates_against_the_schema(engine, tokenizer, vocabulary, sample):
    prompts = random_prompts(3, engine.config.vocab_size, seed=6)
    params = _params(sample, seed=3, guided_json=SCHEMA)
    requests = [_request(vocabulary, i, p, 128, params) for i, p in enumerate(prompts)]
    for tokens in _run(engine, requests).values():
        jsonschema.validate(json.loads(_text(tokenizer, tokens)), SCHEMA)


def test_n_samples_each_follow_the_grammar(engine, tokenizer, vocabulary):
    params = SamplingParams(n=3, temperature=1.0, seed=11, guided_json=JSON_OBJECT_SCHEMA)
    prompt = random_prompts(1, engine.config.vocab_size, seed=7)[0]
    chooser, stopping = params.to_proto(96)
    request = pb.Request(
        id=1, input_ids=prompt, parameters=chooser, stopping_parameters=stopping, num_sequences=3
    )
    _compiled(request, vocabulary)
    answers: dict[int, list[int]] = {}
    batch = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request])))
    while True:
        for generation in batch.generations:
            answers.setdefault(generation.sequence_index, []).extend(generation.tokens.ids)
        if not batch.HasField("batch"):
            break
        batch = engine.decode(pb.DecodeRequest(batches=[batch.batch]))
    assert len(answers) == 3
    texts = {_text(tokenizer, tokens) for tokens in answers.values()}
    assert all(isinstance(json.loads(text), dict) for text in texts)
    assert len(texts) > 1
    assert_no_leaks(engine)


def test_free_rows_get_the_tokens_they_get_alone(engine, tokenizer, vocabulary):
    """Constrained and free rows share batches, joining at different steps (concatenate) and
    leaving at different steps (filter): every row's output is the one it gets alone."""
    prompts = random_prompts(6, engine.config.vocab_size, seed=8)
    grammars = [
        {"guided_regex": REGEX},
        {},
        {"guided_json": SCHEMA},
        {},
        {"guided_regex": REGEX},
        {},
    ]
    samples = [False, True, True, False, True, False]
    lengths = [MAX_NEW, 9, 128, 23, MAX_NEW, 5]
    requests = [
        _request(vocabulary, i, prompt, n, _params(sample, seed=i, **grammar))
        for i, (prompt, n, sample, grammar) in enumerate(zip(prompts, lengths, samples, grammars))
    ]
    alone = {
        r.id: run_schedule(engine.prefill, engine.decode, [Arrival(0, r)]).tokens[r.id]
        for r in requests
    }
    arrivals = [Arrival(step, r) for step, r in zip([0, 0, 2, 3, 5, 7], requests)]
    together = run_schedule(engine.prefill, engine.decode, arrivals)
    assert together.max_batch_size > 2
    assert together.tokens == alone
    assert re.fullmatch(REGEX, _text(tokenizer, together.tokens[0]))
    jsonschema.validate(json.loads(_text(tokenizer, together.tokens[2])), SCHEMA)
    assert_no_leaks(engine)


@pytest.mark.parametrize("index", [b"", b"not an index"], ids=["missing", "damaged"])
def test_a_grammar_without_a_loadable_index_is_refused_alone(engine, vocabulary, index):
    """The shard never compiles: a grammar whose index is missing or damaged fails its own
    request, and the request beside it runs."""
    prompts = random_prompts(2, engine.config.vocab_size, seed=9)
    bad = make_request(1, prompts[0], 8, _params(False, guided_regex="(north|south) [0-9]{9}"))
    bad.parameters.grammar_index = index
    good = _request(vocabulary, 2, prompts[1], 8, _params(False, guided_regex=REGEX))
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[bad, good])))
    assert [refused.request_id for refused in answer.refused] == [1]
    assert "grammar" in answer.refused[0].reason
    assert [generation.request_id for generation in answer.generations] == [2]
    engine.clear_cache(pb.ClearCacheRequest())
    assert_no_leaks(engine)


def test_beam_search_with_a_grammar_is_refused(engine):
    request = make_request(1, [5, 6, 7], 8, _params(False, guided_regex=REGEX))
    request.beam_search.CopyFrom(pb.BeamSearchParameters(beam_width=2, num_return_sequences=1))
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request])))
    assert "beam search" in answer.refused[0].reason
    assert not answer.HasField("batch")
    assert_no_leaks(engine)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"guided_json": {"type": "bogus"}}, "guided_json"),
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
        (
            {"guided_regex": "a", "use_beam_search": True, "beam_width": 2, "temperature": 0.0},
            "beam",
        ),
    ],
)
def test_sampling_params_refuse_bad_grammars(fields, message):
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**fields)


def test_offline_llm_guided_decoding(llm):
    prompts = random_prompts(2, llm.tokenizer.vocab_size, seed=12)
    regex = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, guided_regex=REGEX)
    schema = SamplingParams(temperature=0.8, seed=2, max_tokens=128, guided_json=SCHEMA)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=[regex, schema])
    assert re.fullmatch(REGEX, outputs[0].outputs[0].text)
    jsonschema.validate(json.loads(outputs[1].outputs[0].text), SCHEMA)
    assert [o.outputs[0].finish_reason for o in outputs] == ["stop", "stop"]
    bad_pattern = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(a"}}}
    bad = SamplingParams(max_tokens=8, guided_json=bad_pattern)
    with pytest.raises(ValueError, match="prompt 1: `guided_json` does not compile"):
        llm.generate(prompt_token_ids=prompts, sampling_params=[regex, bad])
    again = llm.generate(prompt_token_ids=prompts[:1], sampling_params=regex)
    assert again[0].outputs[0].text == outputs[0].outputs[0].text


@pytest.fixture
async def router(shard_socket, tiny_llama_dir):
    async with open_router(shard_socket, tiny_llama_dir, max_total_tokens=256) as client:
        yield client


async def test_generate_with_grammar_over_a_real_shard(router):
    regex = {"type": "regex", "value": REGEX}
    parameters = {"max_new_tokens": MAX_NEW, "grammar": regex, "details": True}
    body = {"inputs": "the city", "parameters": parameters}
    answer = await (await router.post("/generate", json=body)).json()
    assert re.fullmatch(REGEX, answer["generated_text"]), answer
    assert answer["details"]["finish_reason"] == "eos_token"
    schema = {"type": "json", "value": SCHEMA}
    params = {"max_new_tokens": 128, "grammar": schema, "do_sample": True, "seed": 4}
    stream = await router.post("/generate_stream", json={"inputs": "river", "parameters": params})
    events = [json.loads(line[5:]) for line in (await stream.text()).splitlines() if line]
    jsonschema.validate(json.loads(events[-1]["generated_text"]), SCHEMA)
    bad = {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "[a-"}}}
    refused = await router.post("/generate", json=bad)
    assert refused.status == 422
    assert "does not compile" in (await refused.json())["error"]


async def test_openai_response_format_gives_valid_json(router):
    api = openai_client(router)
    messages = [{"role": "user", "content": "a person"}]
    # Seeded: chat samples by default, and an unlucky draw may run out of tokens mid-JSON.
    loose = await api.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=96,
        seed=1,
        response_format={"type": "json_object"},
    )
    assert loose.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(loose.choices[0].message.content), dict)
    strict = await api.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=128,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
    )
    assert strict.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(strict.choices[0].message.content), SCHEMA)
    completion = await api.completions.create(
        model="tiny",
        prompt="the",
        max_tokens=128,
        seed=1,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
    )
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMA)
