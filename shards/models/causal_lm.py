"""What every family's causal LM holds for the engine (shards/models/__init__.py:CausalLM): its
config, dtype and device, its pipeline stage, the KV cache's head sizes on this rank, and the LM
head's logits. A family's class builds its embedding, layers, final norm and `lm_head` on it."""

from __future__ import annotations

import torch
from torch import nn

from shardline.shards.models.config import ModelConfig
from shardline.shards.models.heads import check_heads, kv_heads_per_rank
from shardline.shards.utils.weights import Weights


class CausalLMBase(nn.Module):
    lm_head: nn.Module  # built by the family on the last pipeline stage

    def __init__(self, config: ModelConfig, weights: Weights) -> None:
        super().__init__()
        check_heads(config, weights.tp.world_size)
        self.config = config
        self.dtype = weights.dtype
        self.device = weights.device
        self.stage = weights.tp.stage
        self.head_dim = config.head_dim
        self.num_kv_heads_per_rank = kv_heads_per_rank(config.num_kv_heads, weights.tp.world_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab_size] (model dtype) over the full vocabulary, on every rank."""
        return self.lm_head(hidden)
