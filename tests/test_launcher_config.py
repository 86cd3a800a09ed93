"""text-generation-launcher's settings: defaults, flags against TGI's environment variables, the
shard count, the shard and router commands it builds, child output tagging and the env report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shardline.launcher.args import parse_args
from shardline.launcher.commands import router_spec
from shardline.launcher.env_report import runtime_environment
from shardline.launcher.flag_rules import resolve_num_shard
from shardline.launcher.output import ChildOutput
from shardline.launcher.shards import ShardLaunch, shard_config, shard_spec

CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


# ---- flags and environment variables ------------------------------------------------------------


def test_defaults_are_tgis() -> None:
    args = parse_args([], CPU_ONLY)
    assert (args.hostname, args.port) == ("0.0.0.0", 3000)
    assert (args.master_addr, args.master_port) == ("localhost", 29500)
    assert args.max_concurrent_requests == 128
    assert (args.max_best_of, args.max_stop_sequences, args.max_top_n_tokens) == (2, 4, 5)
    assert (args.waiting_served_ratio, args.max_waiting_tokens) == (0.3, 20)
    assert args.max_input_tokens is None and args.max_batch_prefill_tokens is None
    assert args.model_id is None and args.shard_uds_path is None
    assert args.num_shard == 1 and args.json_output is False


def test_every_flag_reads_tgis_environment_variable() -> None:
    environ = {
        **CPU_ONLY,
        "MODEL_ID": "org/model",
        "REVISION": "v1",
        "NUM_SHARD": "2",
        "PORT": "8080",
        "HOSTNAME": "127.0.0.1",
        "DTYPE": "bfloat16",
        "MAX_INPUT_TOKENS": "100",
        "MAX_TOTAL_TOKENS": "200",
        "MAX_BATCH_PREFILL_TOKENS": "300",
        "MAX_BATCH_TOTAL_TOKENS": "4000",
        "MAX_BATCH_SIZE": "8",
        "WAITING_SERVED_RATIO": "1.2",
        "MAX_WAITING_TOKENS": "10",
        "MAX_CONCURRENT_REQUESTS": "7",
        "CUDA_GRAPHS": "1,2",
        "CUDA_MEMORY_FRACTION": "0.5",
        "SHARD_UDS_PATH": "/tmp/x/sock",
        "MASTER_ADDR": "127.0.0.2",
        "MASTER_PORT": "29600",
        "API_KEY": "secret",
        "JSON_OUTPUT": "true",
        "TRUST_REMOTE_CODE": "1",
        "ATTENTION": "torch",
    }
    args = parse_args([], environ)
    assert (args.model_id, args.revision, args.num_shard) == ("org/model", "v1", 2)
    assert (args.port, args.hostname, args.dtype) == (8080, "127.0.0.1", "bfloat16")
    assert (args.max_input_tokens, args.max_total_tokens) == (100, 200)
    assert (args.max_batch_prefill_tokens, args.max_batch_total_tokens) == (300, 4000)
    assert (args.max_batch_size, args.waiting_served_ratio, args.max_waiting_tokens) == (8, 1.2, 10)
    assert (args.max_concurrent_requests, args.cuda_graphs) == (7, "1,2")
    assert (args.cuda_memory_fraction, args.shard_uds_path) == (0.5, "/tmp/x/sock")
    assert (args.master_addr, args.master_port, args.api_key) == ("127.0.0.2", 29600, "secret")
    assert args.json_output and args.trust_remote_code and args.attention == "torch"


def test_a_flag_wins_over_its_environment_variable() -> None:
    args = parse_args(
        ["--port", "9000", "--gpu-memory-utilization", "0.8"], {**CPU_ONLY, "PORT": "1"}
    )
    assert args.port == 9000 and args.cuda_memory_fraction == 0.8


def test_an_invalid_environment_value_names_the_variable(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args([], {**CPU_ONLY, "PORT": "eighty"})
    assert exit_info.value.code == 2
    assert "PORT='eighty'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sharded", "num_shard", "gpus", "expected"),
    [
        (None, None, "", 1),
        (None, None, "0,1,2,3", 4),
        (None, 2, "", 2),
        (False, None, "0,1", 1),
        (True, None, "0,1", 2),
        (True, 4, "", 4),
    ],
)
def test_shard_count_follows_tgis_rules(sharded, num_shard, gpus, expected) -> None:
    environ = {"CUDA_VISIBLE_DEVICES": gpus}
    assert resolve_num_shard(sharded, num_shard, environ) == expected


@pytest.mark.parametrize(("sharded", "num_shard"), [(False, 2), (True, 1), (None, 0), (True, None)])
def test_contradictory_shard_settings_are_refused(sharded, num_shard) -> None:
    with pytest.raises(ValueError):
        resolve_num_shard(sharded, num_shard, {"CUDA_VISIBLE_DEVICES": "0"})


def test_shard_command_and_environment(tmp_path: Path) -> None:
    args = parse_args(
        ["--num-shard", "2", "--dtype", "float32", "--block-size", "32", "--json-output"], CPU_ONLY
    )
    environ = {"PATH": os.environ["PATH"], "NCCL_DEBUG": "INFO", "NVSHMEM_X": "1"}
    config, launch = shard_config(args, tmp_path), ShardLaunch.from_args(args, "/run/s/shard")
    spec = shard_spec(config, launch, 1, environ)
    assert spec.argv[1:3] == ["serve", str(tmp_path)]
    expected = "--rank 1 --world-size 2 --uds-path /run/s/shard --master-addr localhost "
    expected += (
        "--master-port 29500 --dtype float32 --block-size 32 --json-output --logger-level INFO"
    )
    assert " ".join(spec.argv[3:]) == expected
    env = spec.env
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("1", "1", "2")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("localhost", "29500")
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NCCL_DEBUG"] == "INFO" and env["NVSHMEM_X"] == "1"
    kept = shard_spec(config, launch, 0, {**environ, "NCCL_NVLS_ENABLE": "1"}).env
    assert kept["NCCL_NVLS_ENABLE"] == "1"
    tgi_level = {**environ, "LOG_LEVEL": "debug,text_generation_router=info"}
    assert shard_spec(config, launch, 0, tgi_level).argv[-2:] == ["--logger-level", "DEBUG"]


def test_router_command_passes_limits_only_when_set(tmp_path: Path) -> None:
    args = parse_args(["--max-input-tokens", "64", "--api-key", "k", "--port", "81"], CPU_ONLY)
    argv = router_spec(args, tmp_path, "/run/s/shard", {"PATH": os.environ["PATH"]}).argv
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert options["--master-shard-uds-path"] == "/run/s/shard-0"
    assert options["--tokenizer-name"] == str(tmp_path)
    assert options["--model-id"] == "smollm2-135m-instruct"
    assert (options["--port"], options["--max-input-tokens"], options["--api-key"]) == (
        "81",
        "64",
        "k",
    )
    assert options["--shutdown-timeout"] == "60.0"
    assert options["--shard-step-timeout"] == "60.0"
    assert "--max-total-tokens" not in argv and "--json-output" not in argv


def test_json_output_tags_child_lines_with_process_and_rank(tmp_path: Path) -> None:
    args = parse_args(["--num-shard", "2"], CPU_ONLY)
    launch = ShardLaunch.from_args(args, "/s")
    spec = shard_spec(shard_config(args, tmp_path), launch, 1, {"PATH": os.environ["PATH"]})
    path = tmp_path / "out.log"
    with path.open("w") as stream:
        output = ChildOutput(json_output=True, stream=stream)
        output.write(spec, "plain text")
        output.write(spec, json.dumps({"level": "WARNING", "message": "from the shard"}))
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert events[0]["message"] == "plain text" and events[0]["rank"] == 1
    assert events[1]["level"] == "WARNING" and events[1]["process"] == "shard"


def test_env_report_redacts_secrets() -> None:
    report = runtime_environment({"HF_TOKEN": "hf_abc", "NCCL_DEBUG": "INFO", "HOME": "/root"})
    assert report["env"] == {"HF_TOKEN": "<redacted>", "NCCL_DEBUG": "INFO"}
    assert report["packages"]["torch"]
