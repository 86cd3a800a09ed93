"""One ShardConfig: the launcher's flags and LLM's arguments give equal ones, a shard process
reads back the one it was started with, and LLM's shard processes start through the launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardline import LLM, SamplingParams
from shardline.launcher import shards as launcher_shards
from shardline.launcher.args import FLAGS, parse_args
from shardline.launcher.commands import LauncherError
from shardline.launcher.shards import ShardLaunch, shard_config, shard_spec
from shardline.shard_config import FIELD_NAMES, ShardConfig, config_from_flags
from shardline.shards.cli import build_parser
from tests.shard_harness import random_prompts, transformers_greedy

CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
LAUNCHER_FLAGS = [
    *("--num-shard", "2", "--revision", "main", "--dtype", "float32", "--block-size", "8"),
    *("--kv-cache-bytes", "1048576", "--cuda-memory-fraction", "0.5"),
    *("--attention", "torch", "--cuda-graphs", "1,2", "--prefix-caching", "false"),
    *("--rope-scaling", "dynamic", "--rope-factor", "2.5"),
]
LLM_ARGUMENTS = {
    "tensor_parallel_size": 2,
    "revision": "main",
    "dtype": "float32",
    "block_size": 8,
    "kv_cache_bytes": 1 << 20,
    "gpu_memory_utilization": 0.5,
    "attention": "torch",
    "cuda_graphs": "1,2",
    "enable_prefix_caching": False,
    "rope_scaling": "dynamic",
    "rope_factor": 2.5,
}


class _Opened(Exception):
    """Stops LLM(...) once it hands its ShardConfig to the shards."""


def test_every_shard_flag_names_a_config_field() -> None:
    mapped = [flag.shard_field for flag in FLAGS if flag.shard_field is not None]
    assert mapped and set(mapped) <= FIELD_NAMES and len(set(mapped)) == len(mapped)


def test_launcher_flags_and_llm_arguments_give_one_config(tiny_llama_dir: Path, monkeypatch):
    from_flags = shard_config(parse_args(LAUNCHER_FLAGS, CPU_ONLY), tiny_llama_dir)
    assert from_flags != ShardConfig(model=str(tiny_llama_dir))
    opened: list[ShardConfig] = []

    def record(config: ShardConfig, own_process: bool) -> None:
        opened.append(config)
        raise _Opened

    monkeypatch.setattr("shardline.llm.open_shards", record)
    with pytest.raises(_Opened):
        LLM(model=str(tiny_llama_dir), **LLM_ARGUMENTS)
    assert opened == [from_flags]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--block-size", "0"], "block_size"),
        (["--cuda-memory-fraction", "1.5"], "gpu_memory"),
        (["--rope-factor", "0"], "rope_factor"),
    ],
)
def test_a_setting_out_of_range_stops_the_launch_in_one_line(flags, named, tmp_path: Path):
    with pytest.raises(LauncherError, match=named):
        shard_config(parse_args(flags, CPU_ONLY), tmp_path)


def test_a_shard_process_reads_back_its_config(tmp_path: Path) -> None:
    config = shard_config(parse_args(LAUNCHER_FLAGS, CPU_ONLY), tmp_path)
    argv = shard_spec(config, ShardLaunch("/s", "localhost", 29511), 1, {}).argv
    assert config_from_flags(build_parser().parse_args(argv[1:])) == config
    defaults = shard_config(parse_args([], CPU_ONLY), tmp_path)
    assert config_from_flags(build_parser().parse_args(["serve", str(tmp_path)])) == defaults


def test_tensor_parallel_llm_starts_its_shards_through_the_launcher(tiny_llama_dir, monkeypatch):
    started: list[tuple[ShardConfig, ShardLaunch]] = []
    start_shards = launcher_shards.start_shards

    def spy(config, launch, environ, output):
        started.append((config, launch))
        return start_shards(config, launch, environ, output)

    monkeypatch.setattr(launcher_shards, "start_shards", spy)
    llm = LLM(
        model=str(tiny_llama_dir),
        tensor_parallel_size=2,
        block_size=4,
        kv_cache_bytes=1 << 20,
        max_model_len=64,
    )
    try:
        assert started == [(llm.shard_config, llm._shards.launch)]
        assert llm.shard_config.world_size == 2 and llm.shard_config.block_size == 4
        argvs = [" ".join(child.spec.argv) for child in llm._shards._children]
        assert all("--block-size 4 --kv-cache-bytes 1048576" in argv for argv in argvs)
        prompts = random_prompts(2, 384, seed=41)
        params = SamplingParams(temperature=0, max_tokens=4)
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        expected = transformers_greedy(tiny_llama_dir, prompts, [4, 4])
        assert [output.outputs[0].token_ids for output in outputs] == expected
    finally:
        llm.shutdown()
