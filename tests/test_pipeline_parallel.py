"""Pipeline parallelism: the layer split, the settings' checks, and TP 2 x PP 2 (four gloo shard
processes) giving transformers' and the single rank's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from shardline import LLM, SamplingParams
from shardline.launcher.args import parse_args
from shardline.launcher.commands import LauncherError
from shardline.launcher.shards import shard_config
from shardline.sampling_params import BeamSearchParams
from shardline.shard_config import ShardConfig, parse_partition
from shardline.shards.utils.pipeline import PipelineStage, even_partition
from tests.model_factory import TinyModelSpec, build_tiny_model
from tests.shard_harness import JOINING_CHUNKED_LLM, random_prompts, transformers_greedy


@pytest.mark.parametrize(
    ("layers", "stages", "expected"),
    [
        (4, 2, (2, 2)),
        (5, 2, (3, 2)),
        (10, 4, (2, 3, 3, 2)),
        (11, 4, (3, 3, 3, 2)),
        (3, 3, (1,) * 3),
    ],
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


def test_a_world_the_stages_do_not_divide_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="3 shard processes cannot form 2 pipeline stages"):
        ShardConfig(world_size=3, pipeline_parallel_size=2)
    flags = ["--num-shard", "1", "--nnodes", "3", "--pipeline-parallel-size", "2"]
    with pytest.raises(LauncherError, match="3 shard processes cannot form 2 pipeline stages"):
        shard_config(parse_args(flags, {"CUDA_VISIBLE_DEVICES": ""}), tiny_llama_dir)
    flags = ["--num-shard", "2", "--nnodes", "2", "--pipeline-parallel-size", "4"]
    assert shard_config(parse_args(flags, {}), tiny_llama_dir).world_size == 4


def test_llm_runs_tensor_times_pipeline_ranks():
    from shardline.llm import _engine_args

    shard = _engine_args({"tensor_parallel_size": 3, "pipeline_parallel_size": 2}).shard
    assert (shard.world_size, shard.pipeline_parallel_size) == (6, 2)


def test_tp2_pp2_matches_transformers_and_one_rank(llm, tiny_llama_dir):
    """Four ranks (two stages of two): three rows at a time so that requests join running
    batches and two batches run at once (one step in flight while the other's is sent), a
    16-token prefill budget so that prompts are prefilled in chunks, one request ended early by
    a stop token, prompt logprobs shared from the last stage."""
    prompts = random_prompts(9, 384, seed=41, min_len=10)
    lengths = [6, 3, 5, 6, 4, 5, 7, 2, 6]
    expected = transformers_greedy(tiny_llama_dir, prompts, lengths)
    params = [SamplingParams(temperature=0, max_tokens=n, prompt_logprobs=1) for n in lengths]
    stop_token = expected[6][2]
    params[6] = SamplingParams(
        temperature=0, max_tokens=lengths[6], prompt_logprobs=1, stop_token_ids=[stop_token]
    )
    expected[6] = expected[6][: expected[6].index(stop_token) + 1]
    single = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    pipelined = LLM(
        model=str(tiny_llama_dir),
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        **JOINING_CHUNKED_LLM,
    )
    children = [child.process for child in pipelined._shards._children]
    try:
        outputs = pipelined.generate(prompt_token_ids=prompts, sampling_params=params)
        sampled = _sampled_and_beams(pipelined, prompts)
    finally:
        pipelined.shutdown()
    tokens, logprobs = _sampled_and_beams(llm, prompts)
    assert sampled[0] == tokens
    assert sampled[1] == pytest.approx(logprobs, abs=1e-3)
    assert len(children) == 4
    assert all(process.poll() is not None for process in children)
    assert pipelined.metrics.batch_steps_overlapped.value() > 0
    assert llm.metrics.batch_steps_overlapped.value() == 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert [o.outputs[0].token_ids for o in single] == expected
    for one, many in zip(single, outputs, strict=True):
        assert _logprobs(many.prompt_logprobs) == pytest.approx(_logprobs(one.prompt_logprobs))


_SAMPLED = [
    SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=5, logprobs=2),
    SamplingParams(temperature=0.7, seed=9, top_k=20, repetition_penalty=1.3, max_tokens=7),
    SamplingParams(temperature=0.9, seed=3, best_of=3, max_tokens=4),
    SamplingParams(temperature=0, frequency_penalty=0.5, max_tokens=8),
]


def _sampled_and_beams(llm: LLM, prompts: list[list[int]]) -> tuple[list, list[float]]:
    """The tokens of seeded samples (penalties, n, best_of) and of beam searches (which a stage
    but the last completes at once rather than after the next step), and the top logprobs."""
    outputs = llm.generate(prompt_token_ids=prompts[:4], sampling_params=_SAMPLED)
    samples = [c for o in outputs for c in o.outputs]
    logprobs = [v.logprob for c in samples for lp in c.logprobs or [] for v in lp.values()]
    beams = llm.beam_search(
        [{"prompt_token_ids": p} for p in prompts[:2]], BeamSearchParams(beam_width=2, max_tokens=4)
    )
    tokens = [[c.token_ids for c in samples], [[s.tokens for s in b.sequences] for b in beams]]
    return tokens, logprobs


def _logprobs(prompt_logprobs) -> list[float]:
    return [lp.logprob for entry in prompt_logprobs if entry for lp in entry.values()]


@pytest.mark.parametrize(
    ("architecture", "num_layers", "partition"), [("gemma2", 2, "1,1"), ("gpt2", 3, "1,2")]
)
def test_pp2_of_each_model_base_matches_transformers(architecture, num_layers, partition, tmp_path):
    """A family built on each model base over two stages: Gemma 2 (Llama's: the residual stream
    crosses; its sliding and global layers keep their global index) and GPT-2 (LayerNorm
    blocks: the hidden states alone cross), with three layers split unevenly; two batches in
    flight."""
    spec = TinyModelSpec(architecture=architecture, num_layers=num_layers, seed=7)
    model_dir = build_tiny_model(tmp_path / architecture, spec)
    prompts = random_prompts(3, 384, seed=43, min_len=8)
    expected = transformers_greedy(model_dir, prompts, [5] * 3)
    pipelined = LLM(
        model=str(model_dir),
        pipeline_parallel_size=2,
        pipeline_layer_partition=partition,
        block_size=4,
        kv_cache_bytes=1 << 20,
        max_model_len=128,
        max_num_seqs=2,
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=5)
        outputs = pipelined.generate(prompt_token_ids=prompts, sampling_params=params)
    finally:
        pipelined.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert pipelined.metrics.batch_steps_overlapped.value() > 0  # two batches of 2 and 1


def test_a_family_that_does_not_run_as_a_stage_is_refused(tiny_llama_dir, monkeypatch):
    from shardline.shards import models
    from shardline.shards.layers.attention import get_attention_backend
    from shardline.shards.utils.dist import TPGroup

    cpu = torch.device("cpu")
    unstaged = models.Family(lambda *_: torch.nn.Identity(), models.FAMILIES[0].read_config, ())
    monkeypatch.setattr(models, "family_of_config", lambda config: unstaged)
    tp = TPGroup(stage=PipelineStage(index=0, size=2))
    with pytest.raises(ValueError, match="do not run as pipeline stages yet"):
        models.load_model(
            tiny_llama_dir,
            dtype=torch.float32,
            device=cpu,
            tp=tp,
            attention_backend=get_attention_backend("torch", cpu),
        )
