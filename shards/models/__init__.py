"""Model loading: config.json picks the family, each rank reads its weight slices.

A family is one entry of FAMILIES: its model class, the reader that turns config.json (and
generation_config.json) into a ModelConfig, and the `architectures` / `model_type` names that
select it (the first architecture first, then the model type). DEVELOPERS.md says how to add one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from shardline.shards.layers.attention import AttentionBackend, AttentionMetadata
from shardline.shards.models.bloom import BloomForCausalLM, read_bloom_config
from shardline.shards.models.config import ModelConfig
from shardline.shards.models.falcon import FalconForCausalLM, read_falcon_config
from shardline.shards.models.gemma import (
    Gemma2ForCausalLM,
    Gemma3ForConditionalGeneration,
    GemmaForCausalLM,
    read_gemma3_image_text_config,
    read_gemma_config,
)
from shardline.shards.models.gpt2 import GPT2LMHeadModel, read_gpt2_config
from shardline.shards.models.llama import LlamaForCausalLM, read_llama_config
from shardline.shards.models.phi3 import Phi3ForCausalLM, read_phi3_config
from shardline.shards.models.qwen3 import read_qwen3_config
from shardline.shards.utils.dist import TPGroup
from shardline.shards.utils.quantization import UnsupportedQuantizationError, WeightFormat
from shardline.shards.utils.weights import Weights

KVCache = tuple[torch.Tensor, torch.Tensor]
ConfigReader = Callable[[dict, dict], ModelConfig]


class CausalLM(Protocol):
    """What the engine uses of a model: forward is embed → layers → final norm, and
    compute_logits the LM head, so that its layers can be split into stages."""

    config: ModelConfig
    dtype: torch.dtype
    device: torch.device
    num_layers: int
    head_dim: int
    num_kv_heads_per_rank: int

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def eval(self) -> CausalLM: ...


ModelClass = Callable[[ModelConfig, Weights, AttentionBackend], CausalLM]


@dataclass(frozen=True)
class Family:
    model_class: ModelClass
    read_config: ConfigReader
    architectures: tuple[str, ...]
    model_types: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family(
        LlamaForCausalLM,
        read_llama_config,
        ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
        ("llama", "mistral", "qwen2"),
    ),
    Family(LlamaForCausalLM, read_qwen3_config, ("Qwen3ForCausalLM",), ("qwen3",)),
    Family(GemmaForCausalLM, read_gemma_config, ("GemmaForCausalLM",), ("gemma",)),
    Family(
        Gemma2ForCausalLM,
        read_gemma_config,
        ("Gemma2ForCausalLM", "Gemma3ForCausalLM"),
        ("gemma2", "gemma3_text"),
    ),
    Family(
        Gemma3ForConditionalGeneration,
        read_gemma3_image_text_config,
        ("Gemma3ForConditionalGeneration",),
        ("gemma3",),
    ),
    Family(Phi3ForCausalLM, read_phi3_config, ("Phi3ForCausalLM",), ("phi3",)),
    Family(GPT2LMHeadModel, read_gpt2_config, ("GPT2LMHeadModel",), ("gpt2",)),
    Family(BloomForCausalLM, read_bloom_config, ("BloomForCausalLM",), ("bloom",)),
    Family(
        FalconForCausalLM,
        read_falcon_config,
        ("FalconForCausalLM", "RWForCausalLM"),
        ("falcon", "RefinedWeb", "RefinedWebModel"),
    ),
)


def supported_architectures() -> list[str]:
    return [name for family in FAMILIES for name in family.architectures]


def family_of(raw: dict) -> Family:
    """The family of config.json `raw`; a ValueError listing the supported ones if none."""
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    for family in FAMILIES:
        if architectures[:1] and architectures[0] in family.architectures:
            return family
    for family in FAMILIES:
        if not architectures and model_type in family.model_types:
            return family
    raise ValueError(
        f"unsupported architecture {architectures!r} (model_type {model_type!r}); "
        f"supported: {', '.join(supported_architectures())}"
    )


def load_model(
    model_dir: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    tp: TPGroup,
    attention_backend: AttentionBackend,
    quantization: WeightFormat | None = None,
    rope_override: dict | None = None,
) -> CausalLM:
    """The model of `model_dir`, its linear layers in FP8 where `quantization` says so, its
    rope scaling `rope_override` where set (config.rope_override)."""
    config = ModelConfig.from_dir(model_dir, rope_override)
    weights = Weights(model_dir, dtype=dtype, device=device, tp=tp, quantization=quantization)
    model = family_of_config(config).model_class(config, weights, attention_backend)
    if tp.stage.size > 1 and getattr(model, "stage", None) is not tp.stage:
        raise ValueError(
            f"{config.architecture} models do not run as pipeline stages yet "
            "(shards/models/stages.py)"
        )
    if quantization is not None and not _has_fp8_layers(model):
        raise UnsupportedQuantizationError(
            f"{quantization.description} is not supported for {config.architecture} models yet"
        )
    return model.eval()


def _has_fp8_layers(model: torch.nn.Module) -> bool:
    return any(getattr(module, "weight_scale", None) is not None for module in model.modules())


def family_of_config(config: ModelConfig) -> Family:
    return family_of({"architectures": list(config.architectures), "model_type": config.model_type})


__all__ = ["CausalLM", "Family", "FAMILIES", "ModelConfig", "family_of", "load_model"]
