"""n, best_of and beam search through the offline `LLM` API, as vLLM returns them."""

from __future__ import annotations

from shardline import BeamSearchParams, SamplingParams
from tests.shard_harness import random_prompts
from tests.test_sequence_forking import transformers_beams


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


def test_vllm_beam_search_call_returns_every_beam(llm, tiny_llama_dir):
    prompt = random_prompts(1, 384, seed=73, min_len=6)[0]
    params = BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.7)
    (output,) = llm.beam_search([{"prompt_token_ids": prompt}], params)
    eos = [llm.tokenizer.eos_token_id]
    expected = transformers_beams(tiny_llama_dir, prompt, 8, 3, 0.7, False, eos, 3)
    assert [beam.tokens for beam in output.sequences] == [prompt + tokens for tokens in expected]
    texts = [llm.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in expected]
    assert [beam.text for beam in output.sequences] == texts
    assert all(beam.cum_logprob < 0 for beam in output.sequences)
    by_text = llm.beam_search(["the model server", "a cache"], BeamSearchParams(2, 4))
    assert [len(o.sequences) for o in by_text] == [2, 2]
    prompt_ids = llm.tokenizer.encode("a cache")
    assert all(beam.tokens[: len(prompt_ids)] == prompt_ids for beam in by_text[1].sequences)
