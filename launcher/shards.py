"""The shard processes: their ShardConfig from the launcher's flags, their command lines, their start.

`start_shards` is how every shard process starts: the launcher's and those of the offline
`LLM(tensor_parallel_size=N)`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shardline.launcher.args import FLAGS, log_level
from shardline.launcher.commands import (
    SHARD_EXECUTABLE,
    ChildSpec,
    LauncherError,
    find_executable,
    shard_env,
    shard_socket,
)
from shardline.launcher.output import ChildOutput
from shardline.launcher.readiness import shard_is_healthy
from shardline.launcher.supervisor import Child
from shardline.model_files import PACKAGED_MODEL_ALIAS
from shardline.shard_config import ShardConfig, setting_options
from shardline.shards.layers import custom_kernels
from shardline.shards.utils.quantization import weight_format


@dataclass(frozen=True)
class ShardLaunch:
    """Where one run's shard processes listen and meet, and how they log."""

    uds_prefix: str
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    json_output: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, uds_prefix: str) -> ShardLaunch:
        return cls(uds_prefix, args.master_addr, args.master_port, args.json_output)

    def is_serving(self, shard: Child) -> bool:
        return shard_is_healthy(shard_socket(self.uds_prefix, shard.spec.rank))


def shard_config(args: argparse.Namespace, model_dir: Path) -> ShardConfig:
    """The shards' settings from the launcher's flags: those the flag table maps to a field."""
    given = {
        flag.shard_field: getattr(args, flag.dest)
        for flag in FLAGS
        if flag.shard_field is not None and getattr(args, flag.dest) is not None
    }
    if args.disable_custom_kernels:
        given.update(_without_custom_kernels(given))
    try:
        config = ShardConfig(model=str(model_dir), **given)
        weight_format(model_dir, config.quantization)  # an unsupported checkpoint stops here
    except ValueError as error:
        raise LauncherError(str(error)) from None
    return config


def _without_custom_kernels(given: Mapping[str, object]) -> dict[str, str]:
    """`--disable-custom-kernels`: the torch attention and no CUDA graphs (the shards' other Triton
    kernels are turned off by `shard_environment`)."""
    if given.get("attention", "torch") != "torch" or given.get("cuda_graphs", "0") != "0":
        raise LauncherError(
            "--disable-custom-kernels runs the torch attention without CUDA graphs: drop "
            "--attention / --cuda-graphs, or the flag"
        )
    return {"attention": "torch", "cuda_graphs": "0"}


def shard_environment(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The launcher's environment plus what TGI hands the shards as environment variables: the
    watermark's parameters and `--disable-custom-kernels`."""
    values = {
        "WATERMARK_GAMMA": args.watermark_gamma,
        "WATERMARK_DELTA": args.watermark_delta,
        custom_kernels.DISABLE_VARIABLE: "true" if args.disable_custom_kernels else None,
    }
    return {**environ, **{name: str(value) for name, value in values.items() if value is not None}}


def shard_spec(
    config: ShardConfig, launch: ShardLaunch, rank: int, environ: Mapping[str, str]
) -> ChildSpec:
    argv = [
        find_executable(SHARD_EXECUTABLE),
        "serve",
        config.model or PACKAGED_MODEL_ALIAS,
        *("--rank", str(rank), "--world-size", str(config.world_size)),
        *("--uds-path", launch.uds_prefix),
        *("--master-addr", launch.master_addr, "--master-port", str(launch.master_port)),
        *setting_options(config),
        *(["--json-output"] if launch.json_output else []),
        *("--logger-level", log_level(environ)),
    ]
    env = shard_env(environ, rank, config.world_size, launch.master_addr, launch.master_port)
    return ChildSpec(name=f"shard {rank}", argv=argv, env=env, rank=rank)


def start_shards(
    config: ShardConfig, launch: ShardLaunch, environ: Mapping[str, str], output: ChildOutput
) -> list[Child]:
    """One process per rank of `config.world_size`; every command line is built before the
    first starts. Wait for them with `supervisor.wait_until_ready(..., launch.is_serving, ...)`."""
    specs = [shard_spec(config, launch, rank, environ) for rank in range(config.world_size)]
    return [Child(spec, output) for spec in specs]
