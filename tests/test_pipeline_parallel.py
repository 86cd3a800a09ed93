"""Pipeline parallelism: the layer split, the settings' checks, and TP 2 x PP 2 (four gloo shard
processes) giving transformers' and the single rank's greedy tokens."""

from __future__ import annotations

import pytest

from shardline import LLM, SamplingParams
from shardline.shard_config import ShardConfig, parse_partition
from shardline.shards.utils.pipeline import PipelineStage, even_partition
from tests.shard_harness import random_prompts, transformers_greedy


@pytest.mark.parametrize(
    ("layers", "stages", "expected"),
    [(4, 2, (2, 2)), (5, 2, (3, 2)), (10, 4, (2, 3, 3, 2)), (11, 4, (3, 3, 3, 2)), (3, 3, (1,) * 3)],
)
def test_even_partition_gives_the_middle_stages_the_extra_layers(layers, stages, expected):
    assert even_partition(layers, stages) == expected
    ranges = [PipelineStage(index=i, size=stages).layers(layers) for i in range(stages)]
    assert [i for r in ranges for i in r] == list(range(layers))


def test_a_given_partition_is_checked_and_followed():
    assert parse_partition("1,3", 2) == (1, 3)
    assert PipelineStage(index=1, size=2, partition=(1, 3)).layers(4) == range(1, 4)
    with pytest.raises(ValueError, match="names 3 stages"):
        parse_partition("1,1,2", 2)
    with pytest.raises(ValueError, match="at least one layer"):
        parse_partition("0,4", 2)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_partition("a,b", 2)
    with pytest.raises(ValueError, match="covers 5 layers; the model has 4"):
        PipelineStage(index=0, size=2, partition=(2, 3)).layers(4)
    with pytest.raises(ValueError, match="cannot be split into 3"):
        even_partition(2, 3)


def test_a_world_the_stages_do_not_divide_is_refused():
    with pytest.raises(ValueError, match="3 shard processes cannot form 2 pipeline stages"):
        ShardConfig(world_size=3, pipeline_parallel_size=2)


def test_llm_runs_tensor_times_pipeline_ranks():
    from shardline.llm import _engine_args

    shard = _engine_args({"tensor_parallel_size": 3, "pipeline_parallel_size": 2}).shard
    assert (shard.world_size, shard.pipeline_parallel_size) == (6, 2)


def test_tp2_pp2_matches_transformers_and_one_rank(llm, tiny_llama_dir):
    """Four ranks (two stages of two): three rows at a time so that requests join running
    batches, a 16-token prefill budget so that prompts are prefilled in chunks, prompt logprobs
    shared from the last stage."""
    prompts = random_prompts(6, 384, seed=41, min_len=10)
    lengths = [6, 3, 5, 6, 4, 5]
    expected = transformers_greedy(tiny_llama_dir, prompts, lengths)
    params = [SamplingParams(temperature=0, max_tokens=n, prompt_logprobs=1) for n in lengths]
    single = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    pipelined = LLM(
        model=str(tiny_llama_dir),
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        block_size=4,
        kv_cache_bytes=1 << 20,
        max_model_len=256,
        max_num_seqs=3,
        max_num_batched_tokens=16,
    )
    children = [child.process for child in pipelined._shards._children]
    try:
        outputs = pipelined.generate(prompt_token_ids=prompts, sampling_params=params)
    finally:
        pipelined.shutdown()
    assert len(children) == 4
    assert all(process.poll() is not None for process in children)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert [o.outputs[0].token_ids for o in single] == expected
    for one, many in zip(single, outputs, strict=True):
        assert _logprobs(many.prompt_logprobs) == pytest.approx(_logprobs(one.prompt_logprobs))


def _logprobs(prompt_logprobs) -> list[float]:
    return [lp.logprob for entry in prompt_logprobs if entry for lp in entry.values()]
