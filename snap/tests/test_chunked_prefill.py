"""Chunked prefill on a shard: prompts prefilled over several passes, their prompt logprobs,
forks, and the partial prompts' blocks on errors and ClearCache."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from shardline import SamplingParams
from shardline.proto import generate_pb2 as pb
from shardline.shards.engine import ShardEngine
from shardline.shards.request_checks import InvalidRequestError
from tests.shard_harness import (
    Arrival,
    make_request,
    prompt_passes,
    random_prompts,
    run_schedule,
    transformers_greedy,
)
from tests.test_engine import assert_no_leaks, warmed_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dirs: dict[str, Path]) -> ShardEngine:
    return warmed_engine(tiny_model_dirs["llama"])


def _prefill_passes(
    engine: ShardEngine, request: pb.Request, chunk: int
) -> list[pb.PrefillResponse]:
    return [
        engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=100 + i, requests=requests)))
        for i, requests in enumerate(prompt_passes([request], chunk))
    ]


def test_only_the_last_pass_answers(engine):
    prompt = random_prompts(1, engine.config.vocab_size, seed=31, min_len=30, max_len=30)[0]
    answers = _prefill_passes(engine, make_request(1, prompt, 4), chunk=8)
    assert len(answers) == 4
    for answer in answers[:-1]:
        assert not answer.generations and not answer.HasField("batch")
    assert engine.stats().free_blocks < engine.stats().total_blocks  # the prompt's blocks held
    assert [g.request_id for g in answers[-1].generations] == [1]
    engine.clear_cache(pb.ClearCacheRequest(id=answers[-1].batch.id))
    assert_no_leaks(engine)


def test_prompt_logprobs_equal_an_unchunked_prefill(engine):
    prompt = random_prompts(1, engine.config.vocab_size, seed=32, min_len=37, max_len=37)[0]
    request = make_request(1, prompt, 2, decoder_input_details=True)
    whole = _prefill_passes(engine, request, chunk=0)[-1]
    engine.clear_cache(pb.ClearCacheRequest())
    chunked = _prefill_passes(engine, request, chunk=5)[-1]
    engine.clear_cache(pb.ClearCacheRequest())
    expected = whole.generations[0].prefill_tokens
    got = chunked.generations[0].prefill_tokens
    assert list(got.ids) == prompt
    assert math.isnan(got.logprobs[0]) and math.isnan(expected.logprobs[0])
    assert got.logprobs[1:] == pytest.approx(expected.logprobs[1:], abs=1e-4)
    assert chunked.generations[0].tokens.ids == whole.generations[0].tokens.ids
    assert_no_leaks(engine)


def test_sampled_sequences_fork_after_the_last_chunk(engine):
    """n=3 samples of a chunked prompt equal those of the same prompt prefilled at once."""
    prompt = random_prompts(1, engine.config.vocab_size, seed=33, min_len=23, max_len=23)[0]
    params = SamplingParams(temperature=0.8, seed=5, n=3)
    request = make_request(1, prompt, 6, params, num_sequences=3)
    whole = run_schedule(engine.prefill, engine.decode, [Arrival(0, request)])
    by_chunks = run_schedule(engine.prefill, engine.decode, [Arrival(0, request)], chunk=6)
    assert by_chunks.tokens == whole.tokens
    assert_no_leaks(engine)


def test_a_sliding_window_spans_chunks(tiny_model_dirs, tmp_path):
    """Mistral with an 8-token window, prompts prefilled 5 tokens a pass: each chunk's window
    reaches back into the cached chunks before it."""
    model_dir = shutil.copytree(tiny_model_dirs["mistral"], tmp_path / "windowed")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    windowed = warmed_engine(model_dir)
    prompts = random_prompts(3, windowed.config.vocab_size, seed=34, min_len=20, max_len=40)
    expected = transformers_greedy(model_dir, prompts, [10] * 3)
    arrivals = [Arrival(0, make_request(i, p, 10)) for i, p in enumerate(prompts)]
    result = run_schedule(windowed.prefill, windowed.decode, arrivals, mixed=True, chunk=5)
    assert [result.tokens[i] for i in range(3)] == expected
    assert_no_leaks(windowed)


def _first_chunk(engine: ShardEngine, prompt: list[int]) -> pb.Request:
    request = make_request(1, prompt, 4, prefix_len=0, chunk_len=8)
    engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request])))
    return request


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prefix_len": 5}, "continues its prompt at token 5, but 8 tokens were prefilled"),
        ({"prefix_len": 0}, "already being prefilled"),
        ({"id": 2}, "none of it was prefilled"),
        ({"input_ids": "longer"}, "changed its prompt"),
        ({"prefix_len": 40}, "prefix_len"),
    ],
)
def test_a_bad_continuation_is_refused_and_changes_nothing(engine, change, message):
    prompt = random_prompts(1, engine.config.vocab_size, seed=35, min_len=20, max_len=20)[0]
    request = _first_chunk(engine, prompt)
    free = engine.stats().free_blocks
    bad = pb.Request()
    bad.CopyFrom(request)
    bad.prefix_len = 8
    for name, value in change.items():
        if value == "longer":
            bad.input_ids.append(5)
        else:
            setattr(bad, name, value)
    with pytest.raises(InvalidRequestError, match=message):
        engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=2, requests=[bad])))
    assert engine.stats().free_blocks == free
    request.prefix_len, request.chunk_len = 8, 0  # the good continuation still runs
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=3, requests=[request])))
    assert [g.request_id for g in answer.generations] == [1]
    engine.clear_cache(pb.ClearCacheRequest())
    assert_no_leaks(engine)


def test_clear_cache_frees_a_partial_prompt_alone(engine):
    prompts = random_prompts(2, engine.config.vocab_size, seed=36, min_len=20, max_len=20)
    running = engine.prefill(
        pb.PrefillRequest(batch=pb.Batch(id=7, requests=[make_request(9, prompts[1], 30)]))
    )
    _first_chunk(engine, prompts[0])
    engine.clear_cache(pb.ClearCacheRequest(prefilling_request_ids=[1]))
    assert engine.stats().num_sequences == 1  # the running batch is untouched
    engine.decode(pb.DecodeRequest(batches=[running.batch]))
    engine.clear_cache(pb.ClearCacheRequest(id=7))
    assert_no_leaks(engine)
    _first_chunk(engine, prompts[0])
    engine.clear_cache(pb.ClearCacheRequest())  # clearing everything frees partial prompts too
    assert_no_leaks(engine)
