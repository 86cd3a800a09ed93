"""The shard engine in process: greedy tokens equal transformers', blocks are all returned."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardline import SamplingParams
from shardline.proto import generate_pb2 as pb
from shardline.shard_config import ShardConfig
from shardline.shards.bootstrap import create_engine
from shardline.shards.engine import ShardEngine
from shardline.shards.kv_cache import KVCacheExhaustedError
from tests.model_factory import ARCHITECTURES
from tests.shard_harness import (
    Arrival,
    make_request,
    random_prompts,
    run_schedule,
    staggered_arrivals,
    transformers_greedy,
)


def warmed_engine(
    model_dir: Path, kv_cache_bytes: int = 32 << 20, block_size: int = 4
) -> ShardEngine:
    engine = create_engine(
        ShardConfig(model=str(model_dir), kv_cache_bytes=kv_cache_bytes, block_size=block_size)
    )
    engine.warmup(pb.WarmupRequest(max_prefill_tokens=256, max_input_tokens=128))
    return engine


def assert_no_leaks(engine: ShardEngine) -> None:
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks
    assert stats.num_sequences == 0


@pytest.fixture(scope="module")
def engines(tiny_model_dirs: dict[str, Path]) -> dict[str, ShardEngine]:
    return {arch: warmed_engine(path) for arch, path in tiny_model_dirs.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_single_request_matches_transformers(arch, engines, tiny_model_dirs):
    engine = engines[arch]
    prompt = random_prompts(1, engine.config.vocab_size, seed=1)[0]
    expected = transformers_greedy(tiny_model_dirs[arch], [prompt], [24])[0]
    result = run_schedule(engine.prefill, engine.decode, [Arrival(0, make_request(1, prompt, 24))])
    assert result.tokens[1] == expected
    assert_no_leaks(engine)


@pytest.mark.parametrize(
    "launch_next,mixed", [(False, False), (True, False), (False, True), (True, True)]
)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_concurrent_requests_join_and_leave(arch, launch_next, mixed, engines, tiny_model_dirs):
    """8 prompts of different lengths arrive at different steps and stop at different lengths;
    with `launch_next`, steps launched ahead meet joining batches (run on their own); with
    `mixed`, a joining prefill decodes the running batch in its forward pass (or takes its
    step launched ahead)."""
    engine = engines[arch]
    prompts = random_prompts(8, engine.config.vocab_size, seed=2)
    max_new = [5, 17, 9, 30, 1, 12, 22, 7]
    expected = transformers_greedy(tiny_model_dirs[arch], prompts, max_new)
    arrivals = staggered_arrivals([0, 0, 1, 3, 3, 4, 8, 11], prompts, max_new)
    result = run_schedule(engine.prefill, engine.decode, arrivals, launch_next, mixed)
    assert result.max_batch_size > 1
    for i in range(8):
        assert result.tokens[i] == expected[i], f"request {i}"
    assert_no_leaks(engine)


def test_output_is_not_a_flat_repetition(engines):
    engine = engines["llama"]
    prompt = random_prompts(1, engine.config.vocab_size, seed=3)[0]
    request = make_request(1, prompt, 32)
    request.stopping_parameters.ignore_eos_token = True
    result = run_schedule(engine.prefill, engine.decode, [Arrival(0, request)])
    assert len(result.tokens[1]) == 32
    assert len(set(result.tokens[1])) >= 4


def test_finish_reasons_and_generated_counts(engines):
    engine = engines["llama"]
    prompt = random_prompts(1, engine.config.vocab_size, seed=4)[0]
    request = make_request(7, prompt, 3)
    request.stopping_parameters.ignore_eos_token = True
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=99, requests=[request])))
    assert answer.generations[0].generated_tokens == 1
    assert answer.generations[0].finish_reason == pb.FINISH_REASON_NONE
    answer = engine.decode(pb.DecodeRequest(batches=[answer.batch]))
    answer = engine.decode(pb.DecodeRequest(batches=[answer.batch]))
    assert answer.generations[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert answer.generations[0].generated_tokens == 3
    assert not answer.HasField("batch")
    assert_no_leaks(engine)


def test_stop_token_ids_end_generation(engines, tiny_model_dirs):
    engine = engines["llama"]
    prompt = random_prompts(1, engine.config.vocab_size, seed=5)[0]
    free_run = transformers_greedy(tiny_model_dirs["llama"], [prompt], [10])[0]
    stop_token = free_run[3]
    request = make_request(1, prompt, 10)
    request.stopping_parameters.stop_token_ids.append(stop_token)
    result = run_schedule(engine.prefill, engine.decode, [Arrival(0, request)])
    assert result.tokens[1] == free_run[: free_run.index(stop_token) + 1]
    assert result.finish_reasons[1] == pb.FINISH_REASON_STOP_SEQUENCE


def test_filter_batch_frees_blocks_of_removed_requests(engines):
    engine = engines["qwen2"]
    prompts = random_prompts(3, engine.config.vocab_size, seed=6)
    requests = [make_request(i, p, 50) for i, p in enumerate(prompts)]
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=5, requests=requests)))
    answer = engine.decode(pb.DecodeRequest(batches=[answer.batch]))
    used_before = engine.stats().total_blocks - engine.stats().free_blocks
    filtered = engine.filter_batch(pb.FilterBatchRequest(batch_id=5, request_ids=[1]))
    assert list(filtered.batch.request_ids) == [1]
    used_after = engine.stats().total_blocks - engine.stats().free_blocks
    assert used_after < used_before
    engine.decode(pb.DecodeRequest(batches=[filtered.batch]))
    engine.clear_cache(pb.ClearCacheRequest(id=5))
    assert_no_leaks(engine)


def _sampled_requests(engine: ShardEngine, seed: int) -> list[pb.Request]:
    params = SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.3, seed=seed)
    prompts = random_prompts(4, engine.config.vocab_size, seed=seed)
    return [make_request(i, p, 12 + 3 * i, params, top_n_tokens=2) for i, p in enumerate(prompts)]


def _tokens_and_logprobs(generations) -> dict[int, list[tuple[int, float, list[int]]]]:
    return {
        g.request_id: [(g.tokens.ids[0], g.tokens.logprobs[0], list(g.top_tokens[0].ids))]
        for g in generations
    }


def _run_with_filter(engine: ShardEngine, launch_next: bool) -> dict[int, list]:
    """Seeded sampling with penalties; request 1 is filtered out by the router at step 4."""
    batch = pb.Batch(id=21, requests=_sampled_requests(engine, seed=11))
    answer = engine.prefill(pb.PrefillRequest(batch=batch, launch_next=launch_next))
    seen: dict[int, list] = {}
    for step in range(40):
        for rid, items in _tokens_and_logprobs(answer.generations).items():
            seen.setdefault(rid, []).extend(items)
        if not answer.HasField("batch"):
            break
        cached = answer.batch
        if step == 4:
            keep = [rid for rid in cached.request_ids if rid != 1]
            cached = engine.filter_batch(
                pb.FilterBatchRequest(batch_id=cached.id, request_ids=keep)
            ).batch
        answer = engine.decode(pb.DecodeRequest(batches=[cached], launch_next=launch_next))
    return seen


def test_steps_launched_ahead_change_no_token(engines):
    """The same seeded samples, logprobs and top tokens whether the Prefill and each Decode
    launch the next step ahead or not, through a filter; every block comes back."""
    engine = engines["llama"]
    plain = _run_with_filter(engine, launch_next=False)
    assert_no_leaks(engine)
    ahead = _run_with_filter(engine, launch_next=True)
    engine.clear_cache(pb.ClearCacheRequest())
    assert_no_leaks(engine)
    assert ahead.keys() == plain.keys() and len(plain[1]) == 5
    for rid in plain:
        assert [t for t, _, _ in ahead[rid]] == [t for t, _, _ in plain[rid]], rid
        assert [top for _, _, top in ahead[rid]] == [top for _, _, top in plain[rid]], rid
        assert [lp for _, lp, _ in ahead[rid]] == pytest.approx([lp for _, lp, _ in plain[rid]])


@pytest.mark.parametrize("launch_next", [False, True])
def test_seeded_samples_are_the_same_when_joins_decode_in_the_prefill_pass(launch_next, engines):
    engine = engines["llama"]
    requests = _sampled_requests(engine, seed=12)
    arrivals = [Arrival(step, r) for step, r in zip([0, 0, 2, 5], requests)]
    plain = run_schedule(engine.prefill, engine.decode, arrivals)
    assert_no_leaks(engine)
    mixed = run_schedule(engine.prefill, engine.decode, arrivals, launch_next, mixed=True)
    engine.clear_cache(pb.ClearCacheRequest())
    assert_no_leaks(engine)
    assert mixed.tokens == plain.tokens
    assert [len(mixed.tokens[i]) for i in range(4)] == [12, 15, 18, 21]


def test_a_prefill_carrying_running_rows_answers_the_same_prompt_details(engines):
    engine = engines["mistral"]
    running_prompt, prompt = random_prompts(2, engine.config.vocab_size, seed=13, min_len=6)
    joining = make_request(2, prompt, 3, decoder_input_details=True, top_n_tokens=2)
    alone = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=30, requests=[joining])))
    engine.clear_cache(pb.ClearCacheRequest())
    running = engine.prefill(
        pb.PrefillRequest(batch=pb.Batch(id=31, requests=[make_request(1, running_prompt, 9)]))
    )
    mixed = engine.prefill(
        pb.PrefillRequest(batch=pb.Batch(id=32, requests=[joining]), cached_batches=[running.batch])
    )
    assert [g.request_id for g in mixed.generations] == [1, 2]
    assert sorted(mixed.batch.request_ids) == [1, 2] and mixed.batch.id == 31
    ours, theirs = mixed.generations[1], alone.generations[0]
    assert list(ours.prefill_tokens.ids) == list(theirs.prefill_tokens.ids) == prompt
    assert list(ours.prefill_tokens.logprobs)[1:] == pytest.approx(
        list(theirs.prefill_tokens.logprobs)[1:], abs=1e-5
    )
    assert list(ours.top_tokens[0].ids) == list(theirs.top_tokens[0].ids)
    engine.clear_cache(pb.ClearCacheRequest())
    assert_no_leaks(engine)


def test_a_step_launched_ahead_is_not_reused_by_a_new_batch_with_the_same_ids(engines):
    """Request ids restart with a new router: a leftover step must not answer for them."""
    engine = engines["llama"]
    first = _run_with_filter(engine, launch_next=True)
    again = _run_with_filter(engine, launch_next=True)
    engine.clear_cache(pb.ClearCacheRequest())
    assert [[t for t, _, _ in again[rid]] for rid in again] == [
        [t for t, _, _ in first[rid]] for rid in first
    ]
    assert_no_leaks(engine)


def test_prompt_logprobs_and_top_tokens(engines):
    engine = engines["mistral"]
    prompt = random_prompts(1, engine.config.vocab_size, seed=7, min_len=6)[0]
    request = make_request(1, prompt, 2, decoder_input_details=True, top_n_tokens=3)
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=8, requests=[request])))
    generation = answer.generations[0]
    assert list(generation.prefill_tokens.ids) == prompt
    logprobs = list(generation.prefill_tokens.logprobs)
    assert len(logprobs) == len(prompt) and all(lp <= 0 for lp in logprobs[1:])
    assert len(generation.top_tokens[0].ids) == 3
    assert generation.tokens.ids[0] == generation.top_tokens[0].ids[0]
    engine.clear_cache(pb.ClearCacheRequest())
    assert_no_leaks(engine)


def test_request_that_cannot_fit_is_refused_cleanly(tiny_model_dirs):
    engine = warmed_engine(tiny_model_dirs["llama"], kv_cache_bytes=1 << 16, block_size=4)
    total = engine.stats().total_blocks
    too_long = [5] * (total * 4 + 1)
    with pytest.raises(KVCacheExhaustedError, match="KV blocks"):
        engine.prefill(
            pb.PrefillRequest(batch=pb.Batch(id=1, requests=[make_request(1, too_long, 4)]))
        )
    assert_no_leaks(engine)
    prompt = random_prompts(1, engine.config.vocab_size, seed=8)[0]
    result = run_schedule(engine.prefill, engine.decode, [Arrival(0, make_request(2, prompt, 4))])
    assert len(result.tokens[2]) >= 1
    assert_no_leaks(engine)


@pytest.mark.parametrize(
    ("input_ids", "message"),
    [([], "empty prompt"), ([10**6], "vocabulary size")],
)
def test_invalid_requests_change_nothing(engines, input_ids, message):
    engine = engines["llama"]
    answer = engine.prefill(
        pb.PrefillRequest(batch=pb.Batch(id=3, requests=[make_request(1, input_ids, 4)]))
    )
    assert [refused.request_id for refused in answer.refused] == [1]
    assert message in answer.refused[0].reason
    assert not answer.generations and not answer.HasField("batch")
    assert_no_leaks(engine)


def test_a_sliding_window_model_serves_past_its_window(tiny_model_dirs, tmp_path):
    """Mistral with an 8-token window: prompts of 20-40 tokens and 24 new tokens, prefill and
    decode through the paged cache, give transformers' greedy tokens (which the window changes)."""
    import json
    import shutil

    model_dir = shutil.copytree(tiny_model_dirs["mistral"], tmp_path / "windowed")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    engine = warmed_engine(model_dir)
    assert engine.info().max_position_embeddings == config["max_position_embeddings"]
    prompts = random_prompts(4, engine.config.vocab_size, seed=11, min_len=20, max_len=40)
    max_new = [24] * len(prompts)
    expected = transformers_greedy(model_dir, prompts, max_new)
    assert expected != transformers_greedy(tiny_model_dirs["mistral"], prompts, max_new)
    arrivals = [Arrival(i, make_request(i, prompt, 24)) for i, prompt in enumerate(prompts)]
    result = run_schedule(engine.prefill, engine.decode, arrivals)
    assert max(len(tokens) for tokens in expected) == 24
    for i in range(len(prompts)):
        assert result.tokens[i] == expected[i], f"request {i}"
    assert_no_leaks(engine)


@pytest.mark.parametrize("launch_next,mixed", [(False, False), (True, True)])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_matches_transformers(arch, launch_next, mixed, engines, tiny_model_dirs):
    """Prompts prefilled 7 tokens a pass (in several passes each, some beside a running batch
    that decodes in the same pass) give transformers' greedy tokens, and free every block."""
    engine = engines[arch]
    prompts = random_prompts(6, engine.config.vocab_size, seed=21, min_len=5, max_len=40)
    max_new = [12, 3, 20, 8, 15, 6]
    expected = transformers_greedy(tiny_model_dirs[arch], prompts, max_new)
    arrivals = staggered_arrivals([0, 0, 2, 5, 5, 9], prompts, max_new)
    result = run_schedule(engine.prefill, engine.decode, arrivals, launch_next, mixed, chunk=7)
    for i in range(len(prompts)):
        assert result.tokens[i] == expected[i], f"request {i}"
    assert_no_leaks(engine)


def test_warmup_freezes_what_lives_on(engines):
    """After warmup the model and every other long-lived object sit in the garbage
    collector's permanent generation, out of the scans whose pauses would land in steps."""
    import gc

    assert gc.get_freeze_count() > 10_000


def test_a_dropped_engine_is_freed_although_warmup_froze_the_collector(tiny_model_dirs):
    """Warmup freezes the garbage collector's view of everything alive, so an engine caught in a
    reference cycle would never be freed, nor its KV cache and weights: a second engine in the
    same process (an `LLM` made again, the GPU tests) would find no memory."""
    import weakref

    engine = warmed_engine(tiny_model_dirs["llama"])
    prompt = random_prompts(1, engine.config.vocab_size, seed=3)[0]
    run_schedule(engine.prefill, engine.decode, [Arrival(0, make_request(1, prompt, 4))], True)
    dropped = weakref.ref(engine)
    del engine
    assert dropped() is None


def test_a_prefill_asked_to_launch_next_leaves_the_step_the_next_decode_takes(engines, monkeypatch):
    engine = engines["llama"]
    launched = []
    decode = engine.runner.decode
    monkeypatch.setattr(
        engine.runner, "decode", lambda *a, **k: launched.append(1) or decode(*a, **k)
    )
    prompts = random_prompts(2, engine.config.vocab_size, seed=5)
    batch = pb.Batch(id=31, requests=[make_request(i, p, 3) for i, p in enumerate(prompts)])
    answer = engine.prefill(pb.PrefillRequest(batch=batch, launch_next=True))
    assert len(launched) == 1  # the decode step of both rows, launched before answering
    engine.decode(pb.DecodeRequest(batches=[answer.batch]))
    assert len(launched) == 1  # taken from the step in flight
    engine.clear_cache(pb.ClearCacheRequest())
    assert_no_leaks(engine)


@pytest.mark.parametrize(
    ("device", "cuda_build", "chosen"),
    [("cuda", "12.4", ["cublaslt"]), ("cpu", "12.4", []), ("cuda", None, [])],
)
def test_cublaslt_is_chosen_for_cuda_devices_only(
    monkeypatch: pytest.MonkeyPatch, device: str, cuda_build: str | None, chosen: list[str]
) -> None:
    """The 16-bit GEMMs go through cuBLASLt on NVIDIA GPUs (measured faster, RESULTS.md session
    20); a CPU device or a ROCm build (no torch.version.cuda) keeps torch's default."""
    import torch

    from shardline.shards.bootstrap import prefer_cublaslt

    calls: list[str] = []
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", calls.append)
    prefer_cublaslt(torch.device(device))
    assert calls == chosen
