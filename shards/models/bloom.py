"""BLOOM: ALiBi position biases (no position embedding), a LayerNorm on the token embeddings,
LayerNorm blocks with a GELU MLP, a fused query_key_value stored per head as [q, k, v], the LM
head tied to the token embedding. Heads (and their ALiBi slopes) are split across ranks."""

from __future__ import annotations

import torch

from shardline.shards.layers.alibi import alibi_slopes, rank_slopes
from shardline.shards.layers.attention import AttentionBackend
from shardline.shards.layers.attention.fp8_kv import KVScales
from shardline.shards.layers.attention.layer import PagedAttention
from shardline.shards.layers.linear import RowParallelLinear
from shardline.shards.layers.norm import LayerNorm
from shardline.shards.models.config import (
    ModelConfig,
    first_key,
    layer_norm_config,
    refuse_rope_scaling,
)
from shardline.shards.models.fused_attention import FusedQKVAttention
from shardline.shards.models.gelu_mlp import GeluMLP
from shardline.shards.models.layer_norm_lm import LayerNormCausalLM, PreNormBlock
from shardline.shards.models.layout import checkpoint_prefix, grouped_qkv
from shardline.shards.utils.weights import Weights

BLOOM_CONTEXT = 2048  # BLOOM's training length; its config.json names none (ALiBi has no table)


def read_bloom_config(raw: dict, generation: dict) -> ModelConfig:
    if raw.get("apply_residual_connection_post_layernorm"):
        raise ValueError("BLOOM with apply_residual_connection_post_layernorm is not supported")
    refuse_rope_scaling(raw, "ALiBi positions")
    hidden_size = first_key(raw, "hidden_size", "n_embed")
    renamed = {
        "hidden_size": hidden_size,
        "num_attention_heads": first_key(raw, "n_head", "num_attention_heads"),
        "num_hidden_layers": first_key(raw, "n_layer", "num_hidden_layers"),
        "intermediate_size": 4 * hidden_size,
        "max_position_embeddings": raw.get("seq_length") or BLOOM_CONTEXT,
    }
    return layer_norm_config(
        raw,
        generation,
        renamed,
        bias=True,
        tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh",
        alibi=True,
    )


def bloom_block(
    config: ModelConfig,
    weights: Weights,
    prefix: str,
    backend: AttentionBackend,
    slopes: torch.Tensor,
) -> PreNormBlock:
    eps, tp = config.rms_norm_eps, weights.tp
    heads = config.num_heads // tp.world_size
    fused = f"{prefix}.self_attention.query_key_value"
    layout = (config.num_heads, config.num_heads, config.head_dim)  # one query head per KV
    attention = FusedQKVAttention(
        grouped_qkv(weights, fused, layout, True),
        RowParallelLinear.load(weights, f"{prefix}.self_attention.dense", True),
        PagedAttention(
            backend,
            heads,
            config.head_dim,
            alibi_slopes=slopes,
            kv_scales=KVScales.load(weights, f"{prefix}.self_attention"),
        ),
        heads,
    )
    mlp = GeluMLP.load(
        weights,
        f"{prefix}.mlp.dense_h_to_4h",
        f"{prefix}.mlp.dense_4h_to_h",
        True,
        config.hidden_act,
    )
    return PreNormBlock(
        LayerNorm.load(weights, f"{prefix}.input_layernorm", eps),
        attention,
        LayerNorm.load(weights, f"{prefix}.post_attention_layernorm", eps),
        mlp,
    )


class BloomForCausalLM(LayerNormCausalLM):
    def __init__(self, config: ModelConfig, weights: Weights, backend: AttentionBackend) -> None:
        prefix = checkpoint_prefix(weights, "word_embeddings.weight", "transformer.")
        slopes = rank_slopes(alibi_slopes(config.num_heads), weights.tp).to(weights.device)
        super().__init__(
            config,
            weights,
            embedding=f"{prefix}word_embeddings.weight",
            block=lambda i: bloom_block(config, weights, f"{prefix}h.{i}", backend, slopes),
            final_norm=f"{prefix}ln_f",
            lm_head=f"{prefix}word_embeddings.weight",
        )
        if self.stage.is_first:
            self.embedding_norm = LayerNorm.load(
                weights, f"{prefix}word_embeddings_layernorm", config.rms_norm_eps
            )

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embedding_norm(self.embed_tokens(input_ids))
