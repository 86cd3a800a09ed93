"""TGI's rules between the launcher's flags, applied once they are parsed: the deprecated
--max-input-length, --sharded with --num-shard (the GPUs counted when needed), the nodes."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping


def max_input_tokens(args: argparse.Namespace) -> int | None:
    """TGI's rule for its deprecated `--max-input-length`: an alias, never beside the new name."""
    if args.max_input_length is None:
        return args.max_input_tokens
    if args.max_input_tokens is not None:
        raise ValueError(
            "--max-input-tokens and --max-input-length (its deprecated alias) are both set; "
            "set --max-input-tokens only"
        )
    return args.max_input_length


def resolve_num_shard(
    sharded: bool | None, num_shard: int | None, environ: Mapping[str, str] | None = None
) -> int:
    """TGI's rules for `--sharded` with `--num-shard`; the GPUs are counted only when needed."""
    if num_shard is not None and num_shard < 1:
        raise ValueError(f"--num-shard must be at least 1 (got {num_shard})")
    if sharded is False:
        if num_shard not in (None, 1):
            raise ValueError(f"--sharded false contradicts --num-shard {num_shard}")
        return 1
    count = num_shard if num_shard is not None else visible_gpu_count(environ)
    if sharded and count < 2:
        raise ValueError(f"--sharded true needs at least 2 shards (have {count})")
    return max(count, 1)


def check_nodes(nnodes: int, node_rank: int) -> None:
    if nnodes < 1:
        raise ValueError(f"--nnodes must be at least 1 (got {nnodes})")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank must be in 0..{nnodes - 1} (got {node_rank})")


def visible_gpu_count(environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip()])
    import torch

    return torch.cuda.device_count()
