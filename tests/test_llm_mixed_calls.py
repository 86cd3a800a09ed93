"""Many `generate()` calls of every kind in a row on one `LLM`: each answers right, whatever the
call before it left behind (a stop string, a stopped sample, a failed call)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardline import LLM, SamplingParams
from tests.shard_harness import random_prompts, transformers_greedy
from tests.test_sequence_forking import transformers_beams

MAX_NEW = 12


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(3, 384, seed=91, min_len=4, max_len=30)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    return transformers_greedy(tiny_llama_dir, prompts, [MAX_NEW] * len(prompts))


def greedy(**kwargs: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": MAX_NEW, **kwargs})


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)


def check_greedy(llm, prompts, reference):
    outputs = run(llm, prompts, greedy())
    assert [o.outputs[0].token_ids for o in outputs] == reference


def check_stop_string(llm, prompts, reference):
    full = llm.tokenizer.decode(reference[0], skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    (output,) = run(llm, prompts[:1], greedy(stop=[stop]))
    completion = output.outputs[0]
    assert completion.text == full[: full.find(stop)]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    (kept,) = run(llm, prompts[:1], greedy(stop=[stop], include_stop_str_in_output=True))
    assert kept.outputs[0].text == full[: full.find(stop) + len(stop)]


def check_stop_token(llm, prompts, reference):
    stop_token = reference[1][4]
    cut = reference[1].index(stop_token) + 1
    (output,) = run(llm, prompts[1:2], greedy(stop_token_ids=[stop_token]))
    completion = output.outputs[0]
    assert completion.token_ids == reference[1][:cut]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_token


def check_ignore_eos(llm, prompts, reference):
    outputs = run(llm, prompts, greedy(ignore_eos=True, max_tokens=MAX_NEW + 3))
    for output, expected in zip(outputs, reference):
        tokens = output.outputs[0].token_ids
        assert len(tokens) == MAX_NEW + 3 and output.outputs[0].finish_reason == "length"
        assert tokens[: len(expected)] == expected
        assert output.outputs[0].stop_reason is None


def check_samples(llm, prompts, reference):
    params = SamplingParams(temperature=0.9, max_tokens=8, n=3, seed=4, ignore_eos=True)
    first = run(llm, prompts, params)
    assert all(len(o.outputs) == 3 for o in first)
    best = SamplingParams(temperature=0.9, max_tokens=8, n=1, best_of=3, seed=4, ignore_eos=True)
    (best_output,) = run(llm, prompts[:1], best)
    ranked = max(first[0].outputs, key=lambda c: c.cumulative_logprob)
    assert best_output.outputs[0].token_ids == ranked.token_ids
    again = run(llm, prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in again] == [
        [c.token_ids for c in o.outputs] for o in first
    ]


def check_beams(llm, prompts, reference, tiny_llama_dir):
    params = SamplingParams(use_beam_search=True, beam_width=3, n=2, temperature=0, max_tokens=8)
    (output,) = run(llm, prompts[2:], params)
    eos = [llm.tokenizer.eos_token_id]
    expected = transformers_beams(tiny_llama_dir, prompts[2], 8, 3, 1.0, False, eos, 2)
    assert [c.token_ids for c in output.outputs] == expected


def check_failures(llm, prompts, reference):
    with pytest.raises(ValueError, match="max_model_len"):
        run(llm, [[5] * 250], greedy())
    # The prompt is checked before it reaches a shard (the router's Validator), as vLLM does.
    with pytest.raises(ValueError, match="vocabulary"):
        run(llm, [prompts[0], [5, 100_000]], greedy())


def test_many_mixed_calls_in_a_row_each_answer_right(llm, prompts, reference, tiny_llama_dir):
    checks = [
        check_stop_string,
        check_greedy,
        check_stop_token,
        check_stop_string,
        check_samples,
        check_failures,
        check_ignore_eos,
        check_beams,
        check_stop_string,
        check_failures,
        check_greedy,
        check_stop_token,
        check_beams,
        check_greedy,
    ]
    for check in checks:
        if check is check_beams:
            check(llm, prompts, reference, tiny_llama_dir)
        else:
            check(llm, prompts, reference)
        stats = llm._shards.engine.stats()
        assert (stats.num_batches, stats.free_blocks) == (0, stats.total_blocks), check.__name__
