"""Builds a ready ShardEngine from a model folder: device, process group, dtype, weights."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from shardline.shards.cuda_graphs import parse_buckets
from shardline.shards.engine import EngineSettings, ShardEngine
from shardline.shards.layers.attention import get_attention_backend
from shardline.shards.models import load_model
from shardline.shards.models.config import ModelConfig
from shardline.shards.utils.dist import init_distributed

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ShardArgs:
    model_dir: Path
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    dtype: str = "auto"
    block_size: int = 16
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    attention: str = "auto"
    device: str | None = None
    cuda_graphs: str | None = None


def pick_device(rank: int, requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_dtype(requested: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU; on GPU the checkpoint's half type, bfloat16 when it is float32."""
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(
                f"--dtype must be auto or one of {sorted(_DTYPES)} (got {requested!r})"
            )
        return _DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    stored = _DTYPES.get(str(config.torch_dtype).removeprefix("torch."))
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16


def create_engine(args: ShardArgs) -> ShardEngine:
    device = pick_device(args.rank, args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = init_distributed(args.rank, args.world_size, args.master_addr, args.master_port, device)
    config = ModelConfig.from_dir(args.model_dir)
    dtype = pick_dtype(args.dtype, config, device)
    backend = get_attention_backend(args.attention, device)
    logger.info(
        "loading model",
        extra={"model": str(args.model_dir), "dtype": str(dtype), "device": str(device)},
    )
    model = load_model(args.model_dir, dtype=dtype, device=device, tp=tp, attention_backend=backend)
    settings = EngineSettings(
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_impl=backend.name,
        cuda_graph_buckets=parse_buckets(args.cuda_graphs),
        tokenizer_dir=args.model_dir,
    )
    return ShardEngine(model, model.config, tp, device, settings)
