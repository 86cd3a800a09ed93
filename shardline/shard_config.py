"""The settings of a shard, each declared once (name, type, default): `ShardConfig`.

The launcher builds one from its flags (`launcher/shards.py:shard_config`, each flag naming its
field in `launcher/args.py:FLAGS`), the offline `LLM` from its arguments (the same names). A shard
process receives it as its command line (`shardline-shard serve MODEL --block-size 32 ...`: the
settings that differ from their defaults), which `add_config_flags` / `config_from_flags` turn
back into the same object; the in-process shard of `LLM` takes the object itself.

The watermark's gamma and delta are not here: as in TGI, a shard reads them from its environment
(`WATERMARK_GAMMA` / `WATERMARK_DELTA`), which its processes inherit.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "bfloat16", "float16", "float32")
ROPE_SCALINGS = ("linear", "dynamic")  # TGI's --rope-scaling values
QUANTIZE_CHOICES = ("fp8", "compressed-tensors", "fbgemm_fp8")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3fn", "fp8_e5m2")
# Placed by whoever starts the process: the command's positional model, and the group's size
# beside the rank and rendezvous (see launcher/shards.py).
PLACED_FIELDS = ("model", "world_size")


def _setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ShardConfig:
    model: str | None = _setting(
        None,
        "model folder, .gguf file (or a folder holding one), hub id already in the local "
        "cache, or smollm2-135m-instruct (the packaged SmolLM2, also when None)",
    )
    revision: str | None = _setting(None, "hub revision (branch, tag or commit) of a hub id")
    world_size: int = _setting(
        1, "ranks (shard processes) of the whole group: tensor-parallel ranks x pipeline stages"
    )
    pipeline_parallel_size: int = _setting(
        1, "pipeline stages, each of world_size / pipeline_parallel_size tensor-parallel ranks"
    )
    pipeline_layer_partition: str | None = _setting(
        None,
        "decoder layers of each pipeline stage, first to last, e.g. 7,9,9,7 (default: an even "
        "split)",
    )
    dtype: str = _setting(
        "auto",
        "dtype of the weights; auto: float32 on CPU, the checkpoint's half type on GPU",
        DTYPES,
    )
    block_size: int = _setting(16, "tokens per paged KV-cache block")
    kv_cache_bytes: int | None = _setting(
        None, "KV cache size in bytes; default: sized from gpu_memory_utilization on GPU"
    )
    gpu_memory_utilization: float = _setting(
        0.90, "fraction of GPU memory that weights, activations and the KV cache may use"
    )
    attention: str = _setting("auto", "attention backend: auto, torch, triton")
    cuda_graphs: str | None = _setting(
        None, "decode batch sizes to capture CUDA graphs for, e.g. 1,2,4,8; 0 disables"
    )
    device: str | None = _setting(None, "device override, e.g. cpu or cuda:1")
    quantization: str | None = _setting(
        None,
        "fp8: full-precision weights quantized to FP8 at load (per output channel, activations "
        "per token); compressed-tensors, fbgemm_fp8: the checkpoint must be one. FP8 checkpoints "
        "(compressed-tensors, fbgemm_fp8, fp8) are detected from config.json either way",
        QUANTIZE_CHOICES,
    )
    kv_cache_dtype: str = _setting(
        "auto",
        "dtype of the KV cache: auto (the model's), fp8 / fp8_e4m3fn or fp8_e5m2 (scaled by "
        "the checkpoint's k_scale / v_scale, else 1.0)",
        KV_CACHE_DTYPES,
    )
    rope_scaling: str | None = _setting(
        None,
        "rotary scaling forced upon the model instead of its config.json's: linear or dynamic "
        "(NTK), by rope_factor (default 1.0); the context grows by the factor",
        ROPE_SCALINGS,
    )
    rope_factor: float | None = _setting(
        None, "rotary scaling factor; without rope_scaling it means linear scaling"
    )
    enable_prefix_caching: bool = _setting(
        True, "keep full prompt KV blocks in an index and reuse them for shared prefixes"
    )

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"the tensor-parallel size must be at least 1 (got {self.world_size})")
        if self.pipeline_parallel_size < 1 or self.world_size % self.pipeline_parallel_size:
            raise ValueError(
                f"{self.world_size} shard processes cannot form {self.pipeline_parallel_size} "
                "pipeline stages of equal tensor-parallel size: the pipeline-parallel size must "
                "divide the number of shards (times the number of nodes)"
            )
        parse_partition(self.pipeline_layer_partition, self.pipeline_parallel_size)
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1 (got {self.block_size})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.quantization not in (None, *QUANTIZE_CHOICES):
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZE_CHOICES)} "
                f"(got {self.quantization!r})"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} "
                f"(got {self.kv_cache_dtype!r})"
            )
        if self.rope_scaling not in (None, *ROPE_SCALINGS):
            raise ValueError(
                f"rope_scaling must be one of {', '.join(ROPE_SCALINGS)} "
                f"(got {self.rope_scaling!r})"
            )
        if self.rope_factor is not None and not self.rope_factor > 0:
            raise ValueError(f"rope_factor must be positive (got {self.rope_factor})")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})"
            )


def parse_partition(text: str | None, stages: int) -> tuple[int, ...] | None:
    """`"3,5,5,3"`: the layers of each stage, first to last (None: an even split)."""
    if text is None or not text.strip():
        return None
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"the layer partition must be comma-separated integers (got {text!r})"
        ) from None
    if len(counts) != stages:
        raise ValueError(
            f"the layer partition {text!r} names {len(counts)} stages; the pipeline has {stages}"
        )
    if min(counts) < 1:
        raise ValueError(f"every pipeline stage needs at least one layer (got {text!r})")
    return counts


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(ShardConfig))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(name: str) -> Any:
    """The field's type, without its `| None`; a bool's reader of `True` / `False`."""
    hint = typing.get_type_hints(ShardConfig)[name]
    if isinstance(hint, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return _read_bool if hint is bool else hint


def _read_bool(text: str) -> bool:
    if text not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text == "True"


def setting_options(config: ShardConfig) -> list[str]:
    """`--flag value` for each setting that differs from its default (PLACED_FIELDS aside)."""
    argv: list[str] = []
    for setting in dataclasses.fields(ShardConfig):
        value = getattr(config, setting.name)
        if setting.name not in PLACED_FIELDS and value != setting.default:
            argv += [_flag(setting.name), str(value)]
    return argv


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The config's fields as a command's arguments: the model positional, the rest `--flags`."""
    for setting in dataclasses.fields(ShardConfig):
        if setting.name == "model":
            parser.add_argument("model", help=setting.metadata["help"])
            continue
        parser.add_argument(
            _flag(setting.name),
            dest=setting.name,
            type=_value_type(setting.name),
            default=setting.default,
            choices=setting.metadata["choices"],
            help=setting.metadata["help"],
        )


def config_from_flags(namespace: argparse.Namespace) -> ShardConfig:
    return ShardConfig(**{name: getattr(namespace, name) for name in FIELD_NAMES})
