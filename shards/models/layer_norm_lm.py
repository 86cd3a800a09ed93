"""The shape GPT-2, BLOOM and Falcon share: a token embedding (a family may add to it), blocks
that take and return the hidden states (their residual adds inside), a final LayerNorm and the
LM head. Split over pipeline stages as shards/models/stages.py describes; no residual stream
travels between stages."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from shardline.shards.layers.attention import AttentionMetadata
from shardline.shards.layers.attention.layer import KVCache
from shardline.shards.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardline.shards.layers.norm import LayerNorm
from shardline.shards.models.causal_lm import CausalLMBase
from shardline.shards.models.config import ModelConfig
from shardline.shards.models.stages import send_on, stage_input, stage_layers
from shardline.shards.utils.weights import Weights

logger = logging.getLogger(__name__)


class PreNormBlock(nn.Module):
    """hidden + attention(norm(hidden)), then hidden + mlp(norm(hidden)): GPT-2's and BLOOM's
    block, and Falcon's without parallel attention."""

    def __init__(
        self, attention_norm: nn.Module, attention: nn.Module, mlp_norm: nn.Module, mlp: nn.Module
    ) -> None:
        super().__init__()
        self.attention_norm = attention_norm
        self.self_attention = attention
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        normed = self.attention_norm(hidden)
        hidden = hidden + self.self_attention(normed, positions, kv_cache, meta)
        return hidden + self.mlp(self.mlp_norm(hidden))


class LayerNormCausalLM(CausalLMBase):
    def __init__(
        self,
        config: ModelConfig,
        weights: Weights,
        *,
        embedding: str,
        block: Callable[[int], nn.Module],
        final_norm: str,
        lm_head: str,
    ) -> None:
        """`embedding` and `lm_head` name weights, `final_norm` the final LayerNorm's prefix;
        `block(i)` builds decoder block i."""
        super().__init__(config, weights)
        stage = self.stage
        self.embed_tokens = VocabParallelEmbedding(weights, embedding) if stage.is_first else None
        self.layers = stage_layers(stage, config.num_layers, block, logger)
        self.num_layers = len(self.layers)
        if stage.is_last:
            self.norm = LayerNorm.load(weights, final_norm, config.rms_norm_eps)
            self.lm_head = ParallelLMHead(weights, lm_head, config.vocab_size)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The first stage's input to the blocks; families with more than token embeddings
        (learned positions, an embedding LayerNorm) add to it."""
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states [T, hidden_size] of the packed tokens (on a pipeline stage
        but the last, those it sent on)."""
        embed = None if self.embed_tokens is None else lambda ids: self.embed(ids, positions)
        hidden, _ = stage_input(
            self.stage, embed, input_ids, self.config.hidden_size, self.dtype, False
        )
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, positions, kv_cache, meta)
        if not self.stage.is_last:
            return send_on(self.stage, hidden, None)
        return self.norm(hidden)
