"""Qwen3 (dense): the Llama layers with a per-head RMSNorm of q and k before the rotary embedding
(`q_norm` / `k_norm`), and o_proj biased whenever q/k/v are."""

from __future__ import annotations

import dataclasses

from shardline.shards.models.config import ModelConfig
from shardline.shards.models.llama import read_llama_config


def read_qwen3_config(raw: dict, generation: dict) -> ModelConfig:
    return dataclasses.replace(read_llama_config(raw, generation), qk_norm=True)
