"""Phi-3 (mini, medium, 3.5): the Llama layers with q/k/v stored as one `qkv_proj` and gate/up as
one `gate_up_proj`, each rank reading its own rows of every part; LongRoPE scaling (the
checkpoint's `original_max_position_embeddings` at the top level) and a sliding window in every
layer where the config sets one."""

from __future__ import annotations

from shardline.shards.layers.linear import ColumnParallelLinear
from shardline.shards.models.config import (
    ModelConfig,
    decoder_config,
    require_activation,
    typed_layer_windows,
)
from shardline.shards.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
)
from shardline.shards.utils.fp8_weights import read_linear, stack_rows
from shardline.shards.utils.weights import Weights


def read_phi3_config(raw: dict, generation: dict) -> ModelConfig:
    raw = _longrope_named(raw)
    partial = (raw.get("rope_parameters") or {}).get("partial_rotary_factor")
    if (raw.get("partial_rotary_factor") or partial or 1.0) != 1.0:
        raise ValueError(
            "Phi-3 with a partial rotary embedding (partial_rotary_factor) is not supported"
        )
    return decoder_config(
        raw,
        generation,
        hidden_act=require_activation(raw, "hidden_act", ("silu",)),
        layer_windows=typed_layer_windows(raw, lambda i: True),
    )


def _longrope_named(raw: dict) -> dict:
    """The first Phi-3 checkpoints name LongRoPE "su" (or "yarn"), as transformers still reads."""
    key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    scaling = dict(raw.get(key) or {})
    if (scaling.get("rope_type") or scaling.get("type")) not in ("su", "yarn"):
        return raw
    scaling.pop("type", None)
    return {**raw, key: {**scaling, "rope_type": "longrope"}}


def fused_rows(weights: Weights, prefix: str, parts: list[tuple[int, int]]) -> ColumnParallelLinear:
    """Rows [start, stop) of each part of the fused projection `prefix`, stacked in order (FP8
    where the model is)."""
    weight = stack_rows([read_linear(weights, prefix, 0, part) for part in parts])
    return ColumnParallelLinear(weight.weight, None, weight.scale)


class Phi3Attention(LlamaAttention):
    def _load_qkv(self, config: ModelConfig, weights: Weights, prefix: str) -> ColumnParallelLinear:
        """This rank's q rows, then its KV heads' k and v rows, of the fused [q | k | v] rows."""
        tp, head_dim = weights.tp, self.head_dim
        q_rows = self.num_heads * head_dim
        first_q = tp.rank * q_rows
        first_kv = tp.rank * config.num_kv_heads // tp.world_size * head_dim
        kv_rows = self.num_kv_heads * head_dim
        k_start = config.num_heads * head_dim + first_kv
        v_start = k_start + config.num_kv_heads * head_dim
        parts = [
            (first_q, first_q + q_rows),
            (k_start, k_start + kv_rows),
            (v_start, v_start + kv_rows),
        ]
        return fused_rows(weights, f"{prefix}.qkv_proj", parts)


class Phi3MLP(LlamaMLP):
    def _load_gate_up(
        self, config: ModelConfig, weights: Weights, prefix: str
    ) -> ColumnParallelLinear:
        """This rank's share of the gate rows, then of the up rows, of the fused [gate | up]."""
        tp = weights.tp
        if config.intermediate_size % tp.world_size:
            raise ValueError(
                f"intermediate size {config.intermediate_size} cannot be split over "
                f"{tp.world_size} ranks"
            )
        share = config.intermediate_size // tp.world_size
        gate = tp.rank * share
        up = config.intermediate_size + gate
        parts = [(gate, gate + share), (up, up + share)]
        return fused_rows(weights, f"{prefix}.gate_up_proj", parts)


class Phi3DecoderLayer(LlamaDecoderLayer):
    attention_class = Phi3Attention
    mlp_class = Phi3MLP


class Phi3ForCausalLM(LlamaForCausalLM):
    layer_class = Phi3DecoderLayer
