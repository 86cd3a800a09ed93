"""Builds a ready ShardEngine from a ShardConfig: device, process group, dtype, weights."""

from __future__ import annotations

import logging
import os

import torch

from shardline.model_files import resolve_model
from shardline.shard_config import ShardConfig, parse_partition
from shardline.shards.cuda_graphs import parse_buckets
from shardline.shards.engine import EngineSettings, ShardEngine
from shardline.shards.layers.attention import get_attention_backend
from shardline.shards.layers.attention.fp8_kv import kv_cache_dtype
from shardline.shards.models import load_model
from shardline.shards.models.config import ModelConfig, rope_override
from shardline.shards.utils.dist import init_distributed
from shardline.shards.utils.quantization import weight_format

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
        return _DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    stored = _DTYPES.get(str(config.torch_dtype).removeprefix("torch."))
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16


def prefer_cublaslt(device: torch.device) -> None:
    """torch's 16-bit GEMMs through cuBLASLt rather than cuBLAS (a process-wide choice): the 8B
    offline run +0.5-1.6 % in bf16 over three pairs, FP8 + FP8 KV +0.3 % (its LM head), batch-1
    unchanged, an 8,192-token bf16 prefill 1.3 % faster (benchmarks/RESULTS.md, session 20)."""
    if device.type == "cuda" and torch.version.cuda is not None:
        torch.backends.cuda.preferred_blas_library("cublaslt")


def create_engine(
    config: ShardConfig,
    rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    rendezvous_timeout_s: float | None = None,
) -> ShardEngine:
    """Rank `rank` of `config.world_size`, meeting the others at master_addr:master_port (within
    `rendezvous_timeout_s`, which also bounds every collective; torch's default otherwise)."""
    device = pick_device(rank, config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    prefer_cublaslt(device)
    stages = config.pipeline_parallel_size
    partition = parse_partition(config.pipeline_layer_partition, stages)
    tp = init_distributed(
        rank,
        config.world_size,
        master_addr,
        master_port,
        device,
        stages,
        partition,
        rendezvous_timeout_s,
    )
    model_dir = resolve_model(config.model, config.revision)
    model_config = ModelConfig.from_dir(model_dir)
    dtype = pick_dtype(config.dtype, model_config, device)
    backend = get_attention_backend(config.attention, device)
    quantization = weight_format(model_dir, config.quantization)
    kv_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype)
    logger.info(
        "loading model",
        extra={
            "model": str(model_dir),
            "dtype": str(dtype),
            "device": str(device),
            "weights": quantization.description if quantization else str(dtype),
            "kv_cache_dtype": str(kv_dtype),
        },
    )
    model = load_model(
        model_dir,
        dtype=dtype,
        device=device,
        tp=tp,
        attention_backend=backend,
        quantization=quantization,
        rope_override=rope_override(config.rope_scaling, config.rope_factor),
    )
    prefix_caching = config.enable_prefix_caching and not model.config.rotates_by_sequence_length
    if config.enable_prefix_caching and not prefix_caching:
        logger.warning(
            "prefix caching off: the model rotates a sequence by its length (LongRoPE)",
            extra={"model": str(model_dir)},
        )
    settings = EngineSettings(
        block_size=config.block_size,
        kv_cache_bytes=config.kv_cache_bytes,
        gpu_memory_utilization=config.gpu_memory_utilization,
        attention_impl=backend.name,
        cuda_graph_buckets=parse_buckets(config.cuda_graphs),
        prefix_caching=prefix_caching,
        kv_cache_dtype=kv_dtype,
        quantization=quantization.method if quantization else None,
    )
    return ShardEngine(model, model.config, tp, device, settings)
