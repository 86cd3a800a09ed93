"""The offline `LLM` API on a tiny model: vLLM's call shapes, transformers' greedy tokens."""

from __future__ import annotations

import pytest

from shardline import LLM, SamplingParams
from shardline.router.paced_admission import PacedAdmission
from tests.shard_harness import random_prompts, transformers_greedy


def test_greedy_generate_matches_transformers(llm, tiny_llama_dir):
    prompts = random_prompts(6, 384, seed=31)
    expected = transformers_greedy(tiny_llama_dir, prompts, [20] * 6)
    outputs = llm.generate(
        prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=20)
    )
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for output, tokens in zip(outputs, expected):
        assert output.outputs[0].text == llm.tokenizer.decode(tokens, skip_special_tokens=True)
        assert output.outputs[0].finish_reason in ("stop", "length")


def test_more_prompts_than_the_kv_cache_holds_all_complete(llm):
    """The cache holds ~250 tokens; 40 prompts of up to 40 tokens plus 30 new ones queue up."""
    prompts = random_prompts(40, 384, seed=32)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [30] * 40
    assert [o.prompt_token_ids for o in outputs] == prompts


def test_the_longest_requests_start_first_and_outputs_keep_the_prompts_order(llm, monkeypatch):
    let_in = []
    pace = PacedAdmission.let_in

    def recording(admission):
        entries = pace(admission)
        let_in.extend(entry.request.max_new_tokens for entry in entries)
        return entries

    monkeypatch.setattr(PacedAdmission, "let_in", recording)
    lengths = [2, 9, 5, 9, 1]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    prompts = random_prompts(len(lengths), 384, seed=33)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert let_in == [9, 9, 5, 2, 1]
    assert [len(o.outputs[0].token_ids) for o in outputs] == lengths
    assert [o.prompt_token_ids for o in outputs] == prompts


def test_text_prompts_sampling_and_n(llm):
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=12, n=3, seed=7)
    outputs = llm.generate(["the model server is", "a cache"], sampling_params=params)
    assert [o.prompt for o in outputs] == ["the model server is", "a cache"]
    assert all(len(o.outputs) == 3 for o in outputs)
    again = llm.generate(["the model server is", "a cache"], sampling_params=params)
    assert [[c.token_ids for c in o.outputs] for o in outputs] == [
        [c.token_ids for c in o.outputs] for o in again
    ]


def test_one_sampling_params_per_prompt_and_logprobs(llm):
    params = [
        SamplingParams(temperature=0, max_tokens=3, logprobs=2),
        SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=0),
    ]
    first, second = llm.generate(["the model", "a cache block"], sampling_params=params)
    assert len(first.outputs[0].token_ids) <= 3 and len(first.outputs[0].logprobs[0]) >= 2
    assert second.prompt_logprobs[0] is None and len(second.prompt_logprobs) == len(
        second.prompt_token_ids
    )
    assert first.outputs[0].cumulative_logprob <= 0
    chosen = first.outputs[0].token_ids[0]
    step = first.outputs[0].logprobs[0]
    assert step[chosen].rank == 1 and step[chosen].logprob <= 0  # greedy: the top token
    assert sorted(lp.rank for lp in step.values()) == [1, 2]
    assert step[chosen].decoded_token == llm.tokenizer.decode([chosen])
    second_token = second.prompt_token_ids[1]
    assert second.prompt_logprobs[1][second_token].logprob <= 0


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "the capital of France"}]
    (output,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4))
    assert output.prompt.startswith("<|im_start|>user\nthe capital of France<|im_end|>")
    assert output.prompt.endswith("<|im_start|>assistant\n")


def test_bad_arguments_are_clear(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(prompt_token_ids=[[5] * 250], sampling_params=SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="one each"):
        llm.generate(
            ["a", "b"], sampling_params=[SamplingParams(), SamplingParams(), SamplingParams()]
        )
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize(
    "processes", [{"tensor_parallel_size": 2}, {"shard_process": True}], ids=["tp2", "tp1"]
)
def test_shard_processes_answer_as_in_process(tiny_llama_dir, processes):
    """Two ranks (or the one shard in its own process) over gRPC, three rows at a time: requests
    join by prefills that carry the running rows, steps are launched ahead while nothing waits;
    greedy equals transformers."""
    prompts = random_prompts(6, 384, seed=33)
    lengths = [10, 4, 7, 10, 5, 8]
    expected = transformers_greedy(tiny_llama_dir, prompts, lengths)
    llm = LLM(
        model=str(tiny_llama_dir),
        block_size=4,
        kv_cache_bytes=1 << 20,
        max_model_len=256,
        max_num_seqs=3,
        **processes,
    )
    children = [child.process for child in llm._shards._children]
    try:
        params = [SamplingParams(temperature=0, max_tokens=n) for n in lengths]
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        assert [o.outputs[0].token_ids for o in outputs] == expected
    finally:
        llm.shutdown()
    assert all(process.poll() is not None for process in children)


def test_vllm_engine_arguments_are_mapped_or_reported(tiny_llama_dir, caplog):
    from shardline.llm import _engine_args

    with caplog.at_level("WARNING"):
        args = _engine_args({"enforce_eager": True, "swap_space": 4, "block_size": 8})
    assert args.shard.cuda_graphs == "0" and args.shard.block_size == 8
    assert "swap_space" in caplog.text


def test_the_seed_engine_argument_makes_unseeded_sampling_reproducible(tiny_llama_dir):
    params = SamplingParams(temperature=1.0, max_tokens=8)
    runs = [
        LLM(model=str(tiny_llama_dir), seed=3, kv_cache_bytes=1 << 20, max_model_len=128).generate(
            ["the model server"] * 2, params, use_tqdm=False
        )
        for _ in range(2)
    ]
    tokens = [[o.outputs[0].token_ids for o in run] for run in runs]
    assert tokens[0] == tokens[1]
    assert tokens[0][0] != tokens[0][1]


def test_chunked_prefill_matches_transformers(tiny_llama_dir):
    """A 16-token prefill budget: the prompts of up to 40 tokens are prefilled a chunk a
    step, beside the requests already decoding."""
    chunked = LLM(
        model=str(tiny_llama_dir),
        block_size=4,
        kv_cache_bytes=1 << 20,
        max_model_len=256,
        max_num_batched_tokens=16,
    )
    prompts = random_prompts(8, 384, seed=33, min_len=10)
    expected = transformers_greedy(tiny_llama_dir, prompts, [12] * 8)
    params = SamplingParams(temperature=0, max_tokens=12)
    outputs = chunked.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    stats = chunked._shards.engine.stats()
    assert stats.free_blocks == stats.total_blocks


def test_without_chunked_prefill_the_budget_must_hold_a_whole_prompt(tiny_llama_dir):
    with pytest.raises(ValueError, match="enable chunked prefill"):
        LLM(
            model=str(tiny_llama_dir),
            kv_cache_bytes=1 << 20,
            max_model_len=256,
            max_num_batched_tokens=16,
            enable_chunked_prefill=False,
        )
