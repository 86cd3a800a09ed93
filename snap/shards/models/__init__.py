"""Model loading: config.json's architecture picks the class, each rank reads its weight slices."""

from __future__ import annotations

from pathlib import Path

import torch

from shardline.shards.layers.attention import AttentionBackend
from shardline.shards.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from shardline.shards.models.llama import LlamaForCausalLM
from shardline.shards.utils.dist import TPGroup
from shardline.shards.utils.weights import Weights

CausalLM = LlamaForCausalLM
MODEL_CLASSES: dict[str, type[CausalLM]] = dict.fromkeys(SUPPORTED_ARCHITECTURES, LlamaForCausalLM)


def load_model(
    model_dir: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    tp: TPGroup,
    attention_backend: AttentionBackend,
) -> CausalLM:
    config = ModelConfig.from_dir(model_dir)
    weights = Weights(model_dir, dtype=dtype, device=device, tp=tp)
    model = MODEL_CLASSES[config.architecture](config, weights, attention_backend)
    return model.eval()


__all__ = ["CausalLM", "ModelConfig", "load_model"]
