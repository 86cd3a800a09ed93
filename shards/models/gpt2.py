"""GPT-2: learned absolute position embeddings, pre-LayerNorm blocks, a GELU MLP, Conv1D
projections (weights stored [in, out], transposed at load), the LM head tied to the token
embedding. Heads are split across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline.shards.layers.attention import AttentionBackend
from shardline.shards.layers.attention.fp8_kv import KVScales
from shardline.shards.layers.attention.layer import PagedAttention
from shardline.shards.layers.linear import ColumnParallelLinear, RowParallelLinear, frozen
from shardline.shards.layers.norm import LayerNorm
from shardline.shards.models.config import (
    ModelConfig,
    first_key,
    layer_norm_config,
    refuse_rope_scaling,
    require_activation,
)
from shardline.shards.models.fused_attention import FusedQKVAttention
from shardline.shards.models.gelu_mlp import GeluMLP
from shardline.shards.models.layer_norm_lm import LayerNormCausalLM, PreNormBlock
from shardline.shards.models.layout import checkpoint_prefix, conv1d_column, conv1d_qkv, conv1d_row
from shardline.shards.utils.weights import Weights

GELU_VARIANTS = ("gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh")


def read_gpt2_config(raw: dict, generation: dict) -> ModelConfig:
    """GPT2Config's keys (n_embd, n_head, n_layer, n_inner, n_positions) read as Llama's."""
    if raw.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
    refuse_rope_scaling(raw, "learned positions")
    hidden_size = first_key(raw, "n_embd", "hidden_size")
    renamed = {
        "hidden_size": hidden_size,
        "num_attention_heads": first_key(raw, "n_head", "num_attention_heads"),
        "num_hidden_layers": first_key(raw, "n_layer", "num_hidden_layers"),
        "intermediate_size": raw.get("n_inner") or 4 * hidden_size,
        "max_position_embeddings": first_key(raw, "n_positions", "max_position_embeddings"),
    }
    return layer_norm_config(
        raw,
        generation,
        renamed,
        bias=True,
        hidden_act=require_activation(raw, "activation_function", GELU_VARIANTS),
        tie_word_embeddings=True,
        attention_scale=None if raw.get("scale_attn_weights", True) else 1.0,  # unscaled
    )


def gpt2_block(
    config: ModelConfig, weights: Weights, prefix: str, backend: AttentionBackend
) -> PreNormBlock:
    eps, tp = config.rms_norm_eps, weights.tp
    heads = config.num_heads // tp.world_size
    attention = FusedQKVAttention(
        ColumnParallelLinear(*conv1d_qkv(weights, f"{prefix}.attn.c_attn", config.hidden_size)),
        RowParallelLinear(*conv1d_row(weights, f"{prefix}.attn.c_proj"), tp),
        PagedAttention(
            backend,
            heads,
            config.head_dim,
            scale=config.softmax_scale,
            kv_scales=KVScales.load(weights, f"{prefix}.attn"),
        ),
        heads,
    )
    mlp = GeluMLP(
        ColumnParallelLinear(*conv1d_column(weights, f"{prefix}.mlp.c_fc")),
        RowParallelLinear(*conv1d_row(weights, f"{prefix}.mlp.c_proj"), tp),
        config.hidden_act,
    )
    return PreNormBlock(
        LayerNorm.load(weights, f"{prefix}.ln_1", eps),
        attention,
        LayerNorm.load(weights, f"{prefix}.ln_2", eps),
        mlp,
    )


class GPT2LMHeadModel(LayerNormCausalLM):
    def __init__(self, config: ModelConfig, weights: Weights, backend: AttentionBackend) -> None:
        prefix = checkpoint_prefix(weights, "wte.weight", "transformer.")
        super().__init__(
            config,
            weights,
            embedding=f"{prefix}wte.weight",
            block=lambda i: gpt2_block(config, weights, f"{prefix}h.{i}", backend),
            final_norm=f"{prefix}ln_f",
            lm_head=f"{prefix}wte.weight",
        )
        if self.stage.is_first:
            self.position_embeddings = frozen(weights.get_tensor(f"{prefix}wpe.weight"))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) + F.embedding(positions, self.position_embeddings)
