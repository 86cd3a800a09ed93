"""The launcher's children: how a command is found, the shards' environment, the router's command
line (the shards' command lines are built in launcher/shards.py)."""

from __future__ import annotations

import argparse
import os
import shutil
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shardline.model_files import PACKAGED_MODEL_ALIAS

SHARD_EXECUTABLE = "shardline-shard"
ROUTER_EXECUTABLE = "shardline-router"

# NVLink multicast (NVLS) stays off unless the operator turns it on explicitly.
_DISTRIBUTED_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


class LauncherError(RuntimeError):
    """Something the launcher cannot start with; the message says what to do."""


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    rank: int | None = None


def find_executable(name: str) -> str:
    """`name` on PATH, else next to the running interpreter (a venv that is not activated)."""
    found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if found is None:
        raise LauncherError(f"{name} was not found on PATH; is shardline installed?")
    return found


def shard_socket(uds_prefix: str, rank: int) -> str:
    return f"{uds_prefix}-{rank}"


def _options(pairs: Iterable[tuple[str, object]]) -> list[str]:
    """`--flag value` for every set value, a bare `--flag` for True; None and False are left out."""
    argv: list[str] = []
    for flag, value in pairs:
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def shard_env(
    environ: Mapping[str, str],
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    node_ranks: range | None = None,
) -> dict[str, str]:
    """The launcher's environment (NCCL_*, NVSHMEM_*, CUDA_VISIBLE_DEVICES... pass through) plus
    torch.distributed's variables; each rank takes the GPU of its LOCAL_RANK, its place among
    `node_ranks` (this node's ranks; default: all of them)."""
    node_ranks = node_ranks or range(world_size)
    env = dict(environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank - node_ranks.start),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(len(node_ranks)),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        PYTHONUNBUFFERED="1",
    )
    for name, value in _DISTRIBUTED_DEFAULTS.items():
        env.setdefault(name, value)
    if len(node_ranks) > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(node_ranks))))
    return env


def router_spec(
    args: argparse.Namespace, model_dir: Path, uds_prefix: str, environ: Mapping[str, str]
) -> ChildSpec:
    argv = [
        find_executable(ROUTER_EXECUTABLE),
        *_options(
            [
                ("--master-shard-uds-path", shard_socket(uds_prefix, 0)),
                ("--tokenizer-name", model_dir),
                ("--tokenizer-config-path", args.tokenizer_config_path),
                ("--model-id", args.model_id or PACKAGED_MODEL_ALIAS),
                ("--hostname", args.hostname),
                ("--port", args.port),
                ("--prometheus-port", args.prometheus_port),
                ("--max-concurrent-requests", args.max_concurrent_requests),
                ("--max-best-of", args.max_best_of),
                ("--max-stop-sequences", args.max_stop_sequences),
                ("--max-top-n-tokens", args.max_top_n_tokens),
                ("--max-input-tokens", args.max_input_tokens),
                ("--max-total-tokens", args.max_total_tokens),
                ("--waiting-served-ratio", args.waiting_served_ratio),
                ("--max-batch-prefill-tokens", args.max_batch_prefill_tokens),
                ("--max-batch-total-tokens", args.max_batch_total_tokens),
                ("--max-waiting-tokens", args.max_waiting_tokens),
                ("--max-batch-size", args.max_batch_size),
                ("--scheduling-policy", args.scheduling_policy),
                ("--validation-workers", args.validation_workers),
                ("--max-client-batch-size", args.max_client_batch_size),
                ("--payload-limit", args.payload_limit),
                ("--api-key", args.api_key),
                ("--metrics-without-auth", args.metrics_without_auth),
                ("--json-output", args.json_output),
                ("--otlp-endpoint", args.otlp_endpoint),
                ("--otlp-service-name", args.otlp_service_name),
                *(("--cors-allow-origin", origin) for origin in args.cors_allow_origin or ()),
                ("--shutdown-timeout", args.graceful_termination_timeout),
                ("--shard-step-timeout", args.shard_step_timeout),
                ("--disable-grammar-support", args.disable_grammar_support),
                ("--grammar-compile-timeout", args.grammar_compile_timeout),
                ("--max-grammar-bytes", args.max_grammar_bytes),
                ("--shard-warmup-timeout", args.shard_warmup_timeout),
            ]
        ),
    ]
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    return ChildSpec(name="router", argv=argv, env=env)
