"""Prefix caching through the offline `LLM` (on by default, `enable_prefix_caching=False` turns it
off): prompts sharing a long prefix answer exactly as without caching, with samples, best_of,
beams, a grammar, prompt logprobs and chunked prefill, and in two tensor-parallel ranks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shardline import LLM, SamplingParams
from tests.shard_harness import random_prompts, transformers_greedy

COMMON = random_prompts(1, 384, seed=90, min_len=30, max_len=30)[0]
TAILS = random_prompts(4, 384, seed=91, min_len=2, max_len=7)
PROMPTS = [COMMON + tail for tail in TAILS]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=8),
    SamplingParams(temperature=0.8, seed=3, n=2, best_of=3, max_tokens=6),
    SamplingParams(use_beam_search=True, beam_width=3, n=2, temperature=0, max_tokens=6),
    SamplingParams(temperature=0, max_tokens=12, guided_regex="(yes|no|maybe) [a-z]{2,5}"),
]
SETTINGS = {"block_size": 4, "kv_cache_bytes": 1 << 20, "max_model_len": 256}


def _answers(llm: LLM, cached: list[int] | None = None) -> list[list[list[int]]]:
    """Each prompt asked alone after the others, so that it may find their prefix cached;
    `cached` gets each one's prompt tokens found in the cache."""
    outputs = []
    for prompt, sampling in zip(PROMPTS, PARAMS, strict=True):
        (output,) = llm.generate(prompt_token_ids=[prompt], sampling_params=sampling)
        outputs.append([list(sample.token_ids) for sample in output.outputs])
        if cached is not None:
            cached.append(output.num_cached_tokens)
    return outputs


@pytest.fixture(scope="module")
def uncached(tiny_llama_dir: Path) -> Iterator[list[list[list[int]]]]:
    llm = LLM(model=str(tiny_llama_dir), enable_prefix_caching=False, **SETTINGS)
    try:
        yield _answers(llm)
    finally:
        llm.shutdown()


def test_every_path_answers_as_without_caching(llm, uncached):
    cached: list[int] = []
    assert _answers(llm, cached) == uncached
    assert cached == [0, 28, 28, 28]  # the common prefix's seven full blocks of 4
    cached.clear()
    assert _answers(llm, cached) == uncached  # now each finds its own prompt cached
    assert cached == [(len(prompt) - 1) // 4 * 4 for prompt in PROMPTS]


def test_prompts_sent_together_compute_their_common_prefix_once(llm, tiny_llama_dir):
    """The first takes the common prefix's blocks in its pass; the others wait one pass for
    them instead of computing them alongside (router/queue.py)."""
    common = random_prompts(1, 384, seed=92, min_len=30, max_len=30)[0]
    prompts = [common + tail for tail in TAILS]
    params = SamplingParams(temperature=0, max_tokens=4)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert [output.num_cached_tokens for output in outputs] == [0, 28, 28, 28]
    expected = transformers_greedy(tiny_llama_dir, prompts, [4] * len(prompts))
    assert [list(output.outputs[0].token_ids) for output in outputs] == expected


def test_prompt_logprobs_are_those_of_a_cold_run(llm):
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    salted = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, cache_salt="cold")
    llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=SamplingParams(max_tokens=1))
    (warm,) = llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=params)
    (cold,) = llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=salted)
    assert warm.prompt_logprobs == cold.prompt_logprobs
    assert warm.num_cached_tokens == cold.num_cached_tokens == 0  # bypassed the cache


def test_chunked_prefill_and_tensor_parallel_ranks_answer_as_without_caching(
    tiny_llama_dir, uncached
):
    llm = LLM(
        model=str(tiny_llama_dir),
        tensor_parallel_size=2,
        enable_chunked_prefill=True,
        max_num_batched_tokens=8,
        **SETTINGS,
    )
    try:
        cached: list[int] = []
        assert _answers(llm) == uncached
        assert _answers(llm, cached) == uncached
        assert cached == [(len(prompt) - 1) // 4 * 4 for prompt in PROMPTS]
    finally:
        llm.shutdown()
