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
    """Where one run's shard processes listen and meet, and how they log. With several nodes,
    `node_rank` and `nnodes` place this node's ranks; a node other than 0 also serves its shards
    over TCP (`shard_grpc_port`) to node 0's router."""

    uds_prefix: str
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    json_output: bool = False
    node_rank: int = 0
    nnodes: int = 1
    rendezvous_timeout: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, uds_prefix: str) -> ShardLaunch:
        return cls(
            uds_prefix,
            args.master_addr,
            args.master_port,
            args.json_output,
            args.node_rank,
            args.nnodes,
            args.rendezvous_timeout,
        )

    def ranks(self, world_size: int) -> range:
        """The ranks of this node's shard processes."""
        per_node = world_size // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)

    def shard_grpc_port(self, local_rank: int) -> int | None:
        return None if self.node_rank == 0 else self.master_port + 2 + local_rank

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
    if "world_size" in given:
        given["world_size"] *= args.nnodes  # --num-shard counts this node's shards
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
    local = launch.ranks(config.world_size)
    grpc_port = launch.shard_grpc_port(rank - local.start)
    argv = [
        find_executable(SHARD_EXECUTABLE),
        "serve",
        config.model or PACKAGED_MODEL_ALIAS,
        *("--rank", str(rank), "--world-size", str(config.world_size)),
        *("--uds-path", launch.uds_prefix),
        *("--master-addr", launch.master_addr, "--master-port", str(launch.master_port)),
        *setting_options(config),
        *(["--grpc-port", str(grpc_port)] if grpc_port is not None else []),
        *(["--rendezvous-timeout", str(launch.rendezvous_timeout)] if launch.nnodes > 1 else []),
        *(["--json-output"] if launch.json_output else []),
        *("--logger-level", log_level(environ)),
    ]
    env = shard_env(environ, rank, config.world_size, launch.master_addr, launch.master_port, local)
    return ChildSpec(name=f"shard {rank}", argv=argv, env=env, rank=rank)


def start_shards(
    config: ShardConfig, launch: ShardLaunch, environ: Mapping[str, str], output: ChildOutput
) -> list[Child]:
    """One process per rank of `config.world_size` on this node; every command line is built
    before the first starts. Wait for them with `supervisor.wait_until_ready(...,
    launch.is_serving, ...)`."""
    ranks = launch.ranks(config.world_size)
    specs = [shard_spec(config, launch, rank, environ) for rank in ranks]
    return [Child(spec, output) for spec in specs]
