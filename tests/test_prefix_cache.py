"""Prefix caching on a shard: requests that share a prompt prefix share its KV blocks and compute
only the rest, with outputs token-identical to a cold run on every path (chunked prefill, the
running batch carried, samples, beams, prompt logprobs), and no block leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardline import SamplingParams
from shardline.proto import generate_pb2 as pb
from shardline.shard_config import ShardConfig
from shardline.shards.bootstrap import create_engine
from shardline.shards.engine import ShardEngine
from tests.shard_harness import Arrival, make_request, random_prompts, run_schedule
from tests.test_engine import assert_no_leaks

BLOCK = 4


def _engine(model_dir: Path, caching: bool, kv_cache_bytes: int = 32 << 20) -> ShardEngine:
    config = ShardConfig(
        model=str(model_dir),
        kv_cache_bytes=kv_cache_bytes,
        block_size=BLOCK,
        enable_prefix_caching=caching,
    )
    engine = create_engine(config)
    engine.warmup(pb.WarmupRequest(max_prefill_tokens=256, max_input_tokens=128))
    return engine


@pytest.fixture(scope="module")
def engines(tiny_llama_dir: Path) -> dict[bool, ShardEngine]:
    return {caching: _engine(tiny_llama_dir, caching) for caching in (True, False)}


@pytest.fixture
def cached(engines: dict[bool, ShardEngine]) -> ShardEngine:
    engine = engines[True]
    engine.clear_cache(pb.ClearCacheRequest())
    return engine


def _run(engine: ShardEngine, requests: list[pb.Request], **schedule) -> dict[int, list[int]]:
    arrivals = [Arrival(0, request) for request in requests]
    return run_schedule(engine.prefill, engine.decode, arrivals, **schedule).tokens


def _prefill_alone(engine: ShardEngine, request: pb.Request) -> pb.PrefillResponse:
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=900, requests=[request])))
    if answer.HasField("batch"):
        engine.clear_cache(pb.ClearCacheRequest(id=answer.batch.id))
    return answer


def _shared_prefix_prompts(vocab_size: int, count: int, seed: int) -> list[list[int]]:
    """Prompts of a three-block common prefix, each with its own tail of 1 to 9 tokens."""
    common = random_prompts(1, vocab_size, seed, 3 * BLOCK, 3 * BLOCK)[0]
    tails = random_prompts(count, vocab_size, seed + 1, 1, 9)
    return [common + tail for tail in tails]


def test_the_second_request_computes_only_its_new_tokens(cached, engines):
    first, second = _shared_prefix_prompts(cached.config.vocab_size, 2, seed=40)
    counters = cached.allocator.counters
    queried, hits = counters.queried_tokens, counters.hit_tokens
    assert _prefill_alone(cached, make_request(1, first, 1)).cached_tokens == {1: 0}
    answer = _prefill_alone(cached, make_request(2, second, 1))
    assert answer.cached_tokens == {2: 3 * BLOCK}
    assert counters.queried_tokens - queried == len(first) + len(second)
    assert counters.hit_tokens - hits == 3 * BLOCK
    warm = _run(cached, [make_request(3, second, 12)])[3]
    assert warm == _run(engines[False], [make_request(3, second, 12)])[3]
    assert cached.stats().cached_blocks >= 3
    assert_no_leaks(cached)


def test_a_fully_cached_prompt_still_computes_its_last_token(cached, engines):
    prompt = random_prompts(1, cached.config.vocab_size, seed=41, min_len=16, max_len=16)[0]
    cold = _run(engines[False], [make_request(1, prompt, 10)])[1]
    assert _run(cached, [make_request(1, prompt, 10)])[1] == cold
    answer = _prefill_alone(cached, make_request(2, prompt, 1))
    assert answer.cached_tokens == {2: 12}  # three of four blocks: the last token is computed
    assert _run(cached, [make_request(3, prompt, 10)])[3] == cold
    assert_no_leaks(cached)


@pytest.mark.parametrize("mixed", [False, True])
def test_chunked_prefill_continues_from_the_cached_point(cached, engines, mixed):
    """Chunks of 3 tokens over a 12-token cached prefix: the first chunks are found whole in the
    cache and run nothing, the rest compute, beside a running batch when `mixed`."""
    prompts = _shared_prefix_prompts(cached.config.vocab_size, 3, seed=42)
    requests = [make_request(i, p, 8) for i, p in enumerate(prompts)]
    cold = _run(engines[False], requests)
    _run(cached, requests[:1])
    late = [Arrival(0, requests[0]), Arrival(2, requests[1]), Arrival(3, requests[2])]
    got = run_schedule(cached.prefill, cached.decode, late, mixed=mixed, chunk=3).tokens
    assert got == cold
    assert_no_leaks(cached)


def test_samples_and_beams_over_a_cached_prefix_equal_a_cold_run(cached, engines):
    prompts = _shared_prefix_prompts(cached.config.vocab_size, 3, seed=43)
    sampled = SamplingParams(temperature=0.9, seed=7, n=3)
    beam = pb.BeamSearchParameters(beam_width=3, length_penalty=1.0, num_return_sequences=2)
    requests = [
        make_request(0, prompts[0], 6),
        make_request(1, prompts[1], 6, sampled, num_sequences=3),
        make_request(2, prompts[2], 6, beam_search=beam),
    ]

    def outputs(engine: ShardEngine) -> list[pb.Generation]:
        answers = []
        for request in requests:  # one at a time: each after the prompts before it
            arrivals = [Arrival(0, request)]
            run_schedule(_recording(engine.prefill, answers), engine.decode, arrivals)
        return answers

    cold = outputs(engines[False])
    warm = outputs(cached)
    assert [_comparable(g) for g in warm] == [_comparable(g) for g in cold]
    assert cached.allocator.counters.hit_tokens >= 2 * 3 * BLOCK
    assert_no_leaks(cached)


def _recording(prefill, answers: list[pb.Generation]):
    def call(request: pb.PrefillRequest) -> pb.PrefillResponse:
        answer = prefill(request)
        answers.extend(answer.generations)
        return answer

    return call


def _comparable(generation: pb.Generation) -> tuple:
    return (generation.request_id, generation.sequence_index, tuple(generation.tokens.ids))


def test_prompt_logprobs_bypass_the_cache(cached, engines):
    prompt = random_prompts(1, cached.config.vocab_size, seed=44, min_len=14, max_len=14)[0]
    _run(cached, [make_request(1, prompt, 2)])
    detailed = make_request(2, prompt, 2, decoder_input_details=True)
    warm = _prefill_alone(cached, detailed)
    cold = _prefill_alone(engines[False], detailed)
    assert dict(warm.cached_tokens) == {}
    got, expected = warm.generations[0].prefill_tokens, cold.generations[0].prefill_tokens
    assert list(got.logprobs[1:]) == pytest.approx(list(expected.logprobs[1:]), abs=1e-5)
    assert_no_leaks(cached)


def test_salts_never_share_and_the_same_salt_does(cached):
    prompt = random_prompts(1, cached.config.vocab_size, seed=45, min_len=13, max_len=13)[0]
    _prefill_alone(cached, make_request(1, prompt, 1, cache_salt="tenant-a"))
    assert (
        _prefill_alone(cached, make_request(2, prompt, 1, cache_salt="tenant-b")).cached_tokens[2]
        == 0
    )
    assert _prefill_alone(cached, make_request(3, prompt, 1)).cached_tokens[3] == 0
    assert (
        _prefill_alone(cached, make_request(4, prompt, 1, cache_salt="tenant-a")).cached_tokens[4]
        == 12
    )
    assert_no_leaks(cached)


def test_a_reply_is_found_by_the_next_turn(cached, engines):
    """A finished sequence's generated tokens are indexed too, all but its last (whose KV was
    never written): 10 prompt and 12 generated tokens leave five full blocks."""
    prompt = random_prompts(1, cached.config.vocab_size, seed=48, min_len=10, max_len=10)[0]
    endless = SamplingParams(temperature=0.0, seed=0, ignore_eos=True)
    reply = _run(cached, [make_request(1, prompt, 12, endless)])[1]
    turn = prompt + reply + [5, 6, 7]
    assert _prefill_alone(cached, make_request(2, turn, 1)).cached_tokens == {2: 20}
    cold = _run(engines[False], [make_request(3, turn, 8)])[3]
    assert _run(cached, [make_request(3, turn, 8)])[3] == cold
    assert_no_leaks(cached)


def test_a_pass_over_the_warmed_size_runs_its_excess_ahead(cached, engines, monkeypatch):
    """A prompt that found less cached than the router expected makes a pass larger than warmup
    sized the memory for: its excess runs first, in passes within the limit that sample
    nothing, and the answers are those of one pass."""
    prompts = random_prompts(3, cached.config.vocab_size, seed=49, min_len=30, max_len=40)
    requests = [make_request(i, p, 6) for i, p in enumerate(prompts)]
    cold = _run(engines[False], requests)
    passes: list[int] = []
    prefill = cached.runner.prefill

    def recording(chunks, *args, **kwargs):
        passes.append(sum(len(chunk.token_ids) for chunk in chunks))
        return prefill(chunks, *args, **kwargs)

    monkeypatch.setattr(cached.runner, "prefill", recording)
    monkeypatch.setattr(cached, "prefill_limit", 16)
    assert _run(cached, requests) == cold
    assert max(passes) <= 16 and sum(passes) == sum(len(p) for p in prompts)
    assert_no_leaks(cached)


def test_clear_cache_empties_the_index(cached, caplog):
    prompt = random_prompts(1, cached.config.vocab_size, seed=46, min_len=20, max_len=20)[0]
    _run(cached, [make_request(1, prompt, 3)])
    assert cached.stats().cached_blocks == 5
    cached.clear_cache(pb.ClearCacheRequest(keep_prefix_cache=True))
    assert cached.stats().cached_blocks == 5
    with caplog.at_level("INFO"):
        cached.clear_cache(pb.ClearCacheRequest())
    assert "prefix cache cleared: 5 blocks were indexed" in caplog.text
    stats = cached.stats()
    assert stats.cached_blocks == 0 and stats.free_blocks == stats.total_blocks
    assert _prefill_alone(cached, make_request(2, prompt, 1)).cached_tokens == {2: 0}


def test_eviction_under_memory_pressure_keeps_outputs_and_leaks_nothing(tiny_llama_dir, engines):
    """Many distinct prefixes, each pair asked twice in a row, through a cache of a few dozen
    blocks: cached blocks are evicted to make room, and every output equals the cold one."""
    small = _engine(tiny_llama_dir, True, kv_cache_bytes=48 << 10)
    total = small.stats().total_blocks
    prompts = random_prompts(12, small.config.vocab_size, seed=47, min_len=20, max_len=40)
    assert sum(len(p) // BLOCK for p in prompts) > 2 * total  # the index cannot keep them all
    requests = [make_request(i, p, 6) for i, p in enumerate(prompts)]
    cold = _run(engines[False], requests)
    for pair in range(0, len(requests), 2):
        for _ in range(2):
            got = _run(small, requests[pair : pair + 2])
            assert got == {i: cold[i] for i in (pair, pair + 1)}
            assert small.stats().free_blocks == total
    counters = small.allocator.counters
    assert counters.hit_tokens == sum((len(p) - 1) // BLOCK * BLOCK for p in prompts)
    small.clear_cache(pb.ClearCacheRequest())
    assert small.stats().free_blocks == total and small.stats().cached_blocks == 0
