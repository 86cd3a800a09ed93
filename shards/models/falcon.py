"""Falcon: rotary (or, in its RW models, ALiBi) attention with a fused query_key_value stored per
KV head as [its query heads, key, value] (7B: multi-query, one KV head; 40B/180B: the "new
decoder architecture", grouped KV), LayerNorm blocks whose attention and GELU MLP read the same
input and are summed (parallel attention; 40B/180B norm it twice, ln_attn and ln_mlp, Falcon 2
once) or run one after the other, the LM head tied to the token embedding unless the config says
otherwise."""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardline.shards.layers.alibi import alibi_slopes, rank_slopes
from shardline.shards.layers.attention import AttentionBackend, AttentionMetadata
from shardline.shards.layers.attention.fp8_kv import KVScales
from shardline.shards.layers.attention.layer import KVCache, PagedAttention
from shardline.shards.layers.linear import RowParallelLinear
from shardline.shards.layers.norm import LayerNorm
from shardline.shards.layers.rotary import RotaryEmbedding
from shardline.shards.models.config import (
    ModelConfig,
    first_key,
    layer_norm_config,
    refuse_rope_scaling,
    require_activation,
)
from shardline.shards.models.fused_attention import FusedQKVAttention
from shardline.shards.models.gelu_mlp import GeluMLP
from shardline.shards.models.heads import kv_heads_per_rank
from shardline.shards.models.layer_norm_lm import LayerNormCausalLM, PreNormBlock
from shardline.shards.models.layout import grouped_qkv
from shardline.shards.utils.weights import Weights

GELU_VARIANTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")


def read_falcon_config(raw: dict, generation: dict) -> ModelConfig:
    """FalconConfig's keys; the KV head count the layout implies (multi-query: 1, new decoder
    architecture: num_kv_heads, otherwise one per head)."""
    model_type = raw["model_type"]
    hidden_size = first_key(raw, "hidden_size", "n_embed")
    num_heads = first_key(raw, "num_attention_heads", "n_head")
    new_decoder = raw.get("new_decoder_architecture", model_type == "RefinedWeb")
    parallel = raw.get("parallel_attn", True)
    if new_decoder and not parallel:
        raise ValueError("Falcon's new decoder architecture without parallel_attn is not supported")
    if new_decoder:
        num_kv_heads = first_key(raw, "num_kv_heads", "n_head_kv", default=num_heads)
    else:
        num_kv_heads = 1 if raw.get("multi_query", True) else num_heads
    if raw.get("alibi"):
        refuse_rope_scaling(raw, "ALiBi positions")
    renamed = {
        "hidden_size": hidden_size,
        "num_attention_heads": num_heads,
        "num_hidden_layers": first_key(raw, "num_hidden_layers", "n_layer"),
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "intermediate_size": raw.get("ffn_hidden_size") or 4 * hidden_size,
        "max_position_embeddings": raw.get("max_position_embeddings", 2048),
    }
    return layer_norm_config(
        raw,
        generation,
        renamed,
        bias=raw.get("bias", False),
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        hidden_act=require_activation(raw, "activation", GELU_VARIANTS),
        alibi=bool(raw.get("alibi", False)),
        parallel_blocks=parallel,
    )


def falcon_alibi_slopes(config: ModelConfig) -> torch.Tensor:
    """transformers' Falcon rounds the slopes to bfloat16 and scales the bias by the softmax
    scale (BLOOM does neither)."""
    return alibi_slopes(config.num_heads).bfloat16().float() * config.head_dim**-0.5


class FalconBlock(PreNormBlock):
    """Falcon's block: with parallel attention, the attention and the MLP read the same input
    (normed once, or twice by the new decoder architecture) and their outputs are summed."""

    def __init__(
        self, config: ModelConfig, weights: Weights, prefix: str, attention: PagedAttention
    ) -> None:
        eps, bias = config.rms_norm_eps, config.attention_bias
        layout = (config.num_heads, config.num_kv_heads, config.head_dim)
        fused = FusedQKVAttention(
            grouped_qkv(weights, f"{prefix}.self_attention.query_key_value", layout, bias),
            RowParallelLinear.load(weights, f"{prefix}.self_attention.dense", bias),
            attention,
            kv_heads_per_rank(config.num_kv_heads, weights.tp.world_size),
        )
        mlp = GeluMLP.load(
            weights,
            f"{prefix}.mlp.dense_h_to_4h",
            f"{prefix}.mlp.dense_4h_to_h",
            config.mlp_bias,
            config.hidden_act,
        )
        mlp_norm: LayerNorm | None = None
        if f"{prefix}.ln_attn.weight" in weights:  # the new decoder architecture's two norms
            attention_norm = LayerNorm.load(weights, f"{prefix}.ln_attn", eps)
            mlp_norm = LayerNorm.load(weights, f"{prefix}.ln_mlp", eps)
        else:
            attention_norm = LayerNorm.load(weights, f"{prefix}.input_layernorm", eps)
        if not config.parallel_blocks:
            mlp_norm = LayerNorm.load(weights, f"{prefix}.post_attention_layernorm", eps)
        super().__init__(attention_norm, fused, mlp_norm, mlp)
        self.parallel = config.parallel_blocks

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if not self.parallel:
            return super().forward(hidden, positions, kv_cache, meta)
        normed = self.attention_norm(hidden)
        attn, mlp = self.self_attention, self.mlp
        mlp_input = normed if self.mlp_norm is None else self.mlp_norm(hidden)
        # the attention's and the MLP's partial outputs summed over ranks in one all-reduce
        heads = attn.attend(normed, positions, kv_cache, meta)
        out = attn.out.finish(
            attn.out.partial(heads) + mlp.down.partial(mlp.activations(mlp_input))
        )
        return hidden + (out if mlp.down.bias is None else out + mlp.down.bias)


class FalconForCausalLM(LayerNormCausalLM):
    def __init__(self, config: ModelConfig, weights: Weights, backend: AttentionBackend) -> None:
        attention = _attention_factory(config, weights, backend)
        embedding = "transformer.word_embeddings.weight"
        super().__init__(
            config,
            weights,
            embedding=embedding,
            block=lambda i: FalconBlock(
                config,
                weights,
                f"transformer.h.{i}",
                attention(f"transformer.h.{i}.self_attention"),
            ),
            final_norm="transformer.ln_f",
            lm_head=embedding if config.tie_word_embeddings else "lm_head.weight",
        )


def _attention_factory(
    config: ModelConfig, weights: Weights, backend: AttentionBackend
) -> Callable[[str], PagedAttention]:
    """Each block's attention, by the attention module's name: one rotary table (or this rank's
    ALiBi slopes) for all of them, each with its own FP8 cache scales."""
    heads = config.num_heads // weights.tp.world_size
    positions: dict[str, torch.Tensor | RotaryEmbedding] = {}
    if config.alibi:
        slopes = rank_slopes(falcon_alibi_slopes(config), weights.tp).to(weights.device)
        positions["alibi_slopes"] = slopes
    else:
        positions["rotary"] = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            weights.dtype,
            weights.device,
        )
    return lambda prefix: PagedAttention(
        backend, heads, config.head_dim, kv_scales=KVScales.load(weights, prefix), **positions
    )
