"""n, best_of and beam search through the offline `LLM` API, as vLLM returns them."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardline import LLM, SamplingParams
from tests.shard_harness import random_prompts
from tests.test_sequence_forking import transformers_beams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(model=str(tiny_llama_dir), block_size=4, kv_cache_bytes=1 << 20, max_model_len=256)


def test_n_samples_differ_and_best_of_keeps_the_most_likely(llm):
    prompts = random_prompts(2, 384, seed=71)
    params = SamplingParams(temperature=0.9, max_tokens=10, n=3, seed=5, ignore_eos=True)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for output in outputs:
        assert len({tuple(c.token_ids) for c in output.outputs}) == 3
    best = SamplingParams(temperature=0.9, max_tokens=10, n=2, best_of=4, seed=5, ignore_eos=True)
    (output,) = llm.generate(prompt_token_ids=prompts[:1], sampling_params=best, use_tqdm=False)
    everything = SamplingParams(temperature=0.9, max_tokens=10, n=4, seed=5, ignore_eos=True)
    (all_four,) = llm.generate(prompt_token_ids=prompts[:1], sampling_params=everything)
    ranked = sorted(all_four.outputs, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in output.outputs] == [c.token_ids for c in ranked[:2]]


def test_beam_search_returns_transformers_beams(llm, tiny_llama_dir):
    prompt = random_prompts(1, 384, seed=72, min_len=6)[0]
    params = SamplingParams(
        use_beam_search=True, beam_width=3, n=2, length_penalty=0.7, temperature=0, max_tokens=9
    )
    (output,) = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
    eos = [llm.tokenizer.eos_token_id]
    expected = transformers_beams(tiny_llama_dir, prompt, 9, 3, 0.7, False, eos, 2)
    assert [c.token_ids for c in output.outputs] == expected
