"""Every flag of TGI v3's `text-generation-launcher`, with its environment variable: accepted and
acted upon, or refused at startup in one line naming it (never silently ignored)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import unused_port

from shardline.launcher.args import FLAGS, build_parser, parse_args
from shardline.launcher.cli import run
from shardline.launcher.commands import LauncherError, router_spec
from shardline.launcher.shards import ShardLaunch, shard_config, shard_environment, shard_spec
from shardline.router.cli import build_parser as router_parser
from shardline.shards.layers import custom_kernels

CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}

# TGI v3's launcher flags and their variables (docs/source/reference/launcher.md), but for
# --disable-grammar-support, whose author's work is under way.
TGI_FLAGS = [
    "model-id",
    "revision",
    "validation-workers",
    "sharded",
    "num-shard",
    "quantize",
    "speculate",
    "dtype",
    "kv-cache-dtype",
    "trust-remote-code",
    "max-concurrent-requests",
    "max-best-of",
    "max-stop-sequences",
    "max-top-n-tokens",
    "max-input-tokens",
    "max-input-length",
    "max-total-tokens",
    "waiting-served-ratio",
    "max-batch-prefill-tokens",
    "max-batch-total-tokens",
    "max-waiting-tokens",
    "max-batch-size",
    "cuda-graphs",
    "hostname",
    "port",
    "prometheus-port",
    "shard-uds-path",
    "master-addr",
    "master-port",
    "huggingface-hub-cache",
    "weights-cache-override",
    "disable-custom-kernels",
    "cuda-memory-fraction",
    "rope-scaling",
    "rope-factor",
    "json-output",
    "otlp-endpoint",
    "otlp-service-name",
    "cors-allow-origin",
    "api-key",
    "watermark-gamma",
    "watermark-delta",
    "ngrok",
    "ngrok-authtoken",
    "ngrok-edge",
    "tokenizer-config-path",
    "max-client-batch-size",
    "lora-adapters",
    "usage-stats",
    "payload-limit",
    "enable-prefill-logprobs",
    "graceful-termination-timeout",
]

# A value each refused flag's variable may hold that Shardline would have to act upon.
REFUSED_VALUES = {
    "QUANTIZE": "awq",
    "SPECULATE": "2",
    "LORA_ADAPTERS": "org/adapter",
    "WEIGHTS_CACHE_OVERRIDE": "/weights",
    "NGROK": "true",
    "NGROK_AUTHTOKEN": "s3cret-token",
    "NGROK_EDGE": "edge",
}


def _spec(name: str):
    return next(flag for flag in FLAGS if flag.long_name == f"--{name}")


@pytest.mark.parametrize("name", TGI_FLAGS)
def test_every_tgi_flag_is_declared_with_tgis_variable(name: str) -> None:
    options = {
        option for action in build_parser(CPU_ONLY)._actions for option in action.option_strings
    }
    assert f"--{name}" in options
    assert _spec(name).env == name.upper().replace("-", "_")


def test_refused_values_cover_every_refused_flag() -> None:
    assert set(REFUSED_VALUES) == {flag.env for flag in FLAGS if flag.refused}


@pytest.mark.parametrize(("variable", "value"), sorted(REFUSED_VALUES.items()))
def test_an_unsupported_tgi_variable_stops_the_start_in_one_line(variable, value, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args([], {**CPU_ONLY, variable: value})
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"error: {variable} (--" in error
    assert "not supported" in error and value not in error.split(" is ", 1)[1]


@pytest.mark.parametrize(
    "argv",
    [["--quantize", "gptq"], ["--speculate=2"], ["--lora-adapters", "a,b"]],
)
def test_an_unsupported_flag_is_named_as_given(argv, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv, CPU_ONLY)
    error = capsys.readouterr().err
    assert f"error: {argv[0].split('=')[0]} is not supported yet: " in error


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--speculate", "0"], {}),
        ([], {"NGROK": "false"}),
        (["--usage-stats", "off", "--enable-prefill-logprobs"], {}),
        ([], {"USAGE_STATS": "no-stack", "ENABLE_PREFILL_LOGPROBS": "true"}),
    ],
)
def test_values_that_change_nothing_here_are_accepted(argv, environ) -> None:
    parse_args(argv, {**CPU_ONLY, **environ})


def test_max_input_length_is_the_deprecated_alias_of_max_input_tokens(capsys) -> None:
    assert parse_args([], {**CPU_ONLY, "MAX_INPUT_LENGTH": "100"}).max_input_tokens == 100
    assert parse_args(["--max-input-length", "7"], CPU_ONLY).max_input_tokens == 7
    with pytest.raises(SystemExit):
        parse_args(["--max-input-length", "7", "--max-input-tokens", "8"], CPU_ONLY)
    assert "both set" in capsys.readouterr().err


def test_disable_custom_kernels_runs_torch_attention_without_cuda_graphs(tmp_path: Path) -> None:
    environ = {"PATH": os.environ["PATH"]}
    args = parse_args([], {**CPU_ONLY, "DISABLE_CUSTOM_KERNELS": "true"})
    launch = ShardLaunch("/s")
    argv = shard_spec(shard_config(args, tmp_path), launch, 0, environ).argv
    assert argv[argv.index("--attention") + 1] == "torch"
    assert argv[argv.index("--cuda-graphs") + 1] == "0"
    plain_config = shard_config(parse_args(["--cuda-graphs", "1,2"], CPU_ONLY), tmp_path)
    plain = shard_spec(plain_config, launch, 0, environ)
    assert "--attention" not in plain.argv and "1,2" in plain.argv
    clash = parse_args(["--disable-custom-kernels", "--attention", "triton"], CPU_ONLY)
    with pytest.raises(LauncherError, match="--disable-custom-kernels"):
        shard_spec(shard_config(clash, tmp_path), launch, 0, environ)


def test_disable_custom_kernels_reaches_the_shards_as_tgis_variable(monkeypatch) -> None:
    args = parse_args(["--disable-custom-kernels"], CPU_ONLY)
    assert shard_environment(args, {})["DISABLE_CUSTOM_KERNELS"] == "true"
    assert "DISABLE_CUSTOM_KERNELS" not in shard_environment(parse_args([], CPU_ONLY), {})
    # In the shard, every Triton kernel's gate (norms, SiLU, rotary, GEMV, sampler) is closed.
    cuda_tensor = SimpleNamespace(is_cuda=True)
    for value, takes_triton in (("true", False), ("", True)):
        monkeypatch.setenv("DISABLE_CUSTOM_KERNELS", value)
        custom_kernels.disabled.cache_clear()
        assert custom_kernels.applies(cuda_tensor) is takes_triton
    custom_kernels.disabled.cache_clear()


def test_watermark_parameters_reach_the_shards_as_tgis_variables(tmp_path: Path) -> None:
    args = parse_args(["--watermark-gamma", "0.25", "--watermark-delta", "3"], CPU_ONLY)
    config, launch = shard_config(args, tmp_path), ShardLaunch("/s")
    env = shard_spec(config, launch, 0, shard_environment(args, {"PATH": os.environ["PATH"]})).env
    assert (env["WATERMARK_GAMMA"], env["WATERMARK_DELTA"]) == ("0.25", "3.0")
    unset = shard_spec(config, launch, 0, shard_environment(parse_args([], CPU_ONLY), {})).env
    assert "WATERMARK_GAMMA" not in unset and "WATERMARK_DELTA" not in unset


def test_tracing_and_cors_settings_reach_the_router(tmp_path: Path) -> None:
    environ = {**CPU_ONLY, "OTLP_ENDPOINT": "http://collector:4317", "CORS_ALLOW_ORIGIN": "a, b"}
    args = parse_args(["--cors-allow-origin", "https://c.example"], environ)
    argv = router_spec(args, tmp_path, "/s", {"PATH": os.environ["PATH"]}).argv[1:]
    routed = router_parser().parse_args(["--tokenizer-name", "t", *argv])
    assert routed.otlp_endpoint == "http://collector:4317"
    assert routed.otlp_service_name == "text-generation-inference.router"
    assert routed.cors_allow_origin == ["https://c.example"]  # the flag wins over the variable
    default = router_spec(parse_args([], environ), tmp_path, "/s", {}).argv[1:]
    assert router_parser().parse_args(["--tokenizer-name", "t", *default]).cors_allow_origin == [
        "a",
        "b",
    ]


def test_fp8_weights_and_kv_cache_reach_the_shards(tmp_path: Path) -> None:
    environ = {**CPU_ONLY, "KV_CACHE_DTYPE": "fp8_e5m2", "PATH": os.environ["PATH"]}
    args = parse_args(["--quantize", "fp8"], environ)
    argv = shard_spec(shard_config(args, tmp_path), ShardLaunch("/s"), 0, environ).argv
    assert argv[argv.index("--quantization") + 1] == "fp8"
    assert argv[argv.index("--kv-cache-dtype") + 1] == "fp8_e5m2"


def test_an_unsupported_checkpoint_quantization_stops_the_start(
    tmp_path: Path, tiny_llama_dir: Path, capfd
) -> None:
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "awq")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(LauncherError, match="checkpoint quantization 'awq' is not supported"):
        shard_config(parse_args([], CPU_ONLY), model_dir)
    port = ["--port", str(unused_port()), "--prometheus-port", "0"]
    assert run(["--model-id", str(model_dir), *port], CPU_ONLY) == 1
    assert "checkpoint quantization 'awq' is not supported" in capfd.readouterr().err
