"""Gemma, Gemma 2 and Gemma 3 (text): the Llama layers with Gemma's differences.

RMSNorms scale by 1 + weight (folded into the weight at load); the MLP is GeGLU (tanh GELU);
token embeddings are multiplied by sqrt(hidden_size). Gemma keeps Llama's two norms a layer;
Gemma 2 and 3 norm the attention output and the MLP's input and output too (post_attention,
pre_ / post_feedforward norms), scale the softmax by query_pre_attn_scalar ** -0.5 and alternate
sliding-window layers with global ones (layer_types). Gemma 2 caps the attention scores and the
logits (cap * tanh(x / cap)); Gemma 3 norms q and k per head and rotates its sliding layers with
their own, unscaled base.
"""

from __future__ import annotations

import torch
from torch import nn

from shardline.shards.layers.activation import gelu_tanh_and_mul
from shardline.shards.layers.attention import AttentionBackend, AttentionMetadata
from shardline.shards.layers.fp8 import FP8Rows, Product
from shardline.shards.layers.rotary import RotaryEmbedding
from shardline.shards.models.config import (
    DEFAULT_MAX_POSITIONS,
    ModelConfig,
    decoder_config,
    require_activation,
    typed_layer_windows,
)
from shardline.shards.models.llama import (
    KVCache,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    rms_norm,
)
from shardline.shards.utils.weights import Weights

GELU_TANH = ("gelu_pytorch_tanh",)
GEMMA3_SLIDING_PATTERN = 6  # transformers' Gemma3TextConfig: every 6th layer is global


def read_gemma_config(raw: dict, generation: dict) -> ModelConfig:
    """Gemma (`gemma`), Gemma 2 (`gemma2`) and Gemma 3's text model (`gemma3_text`)."""
    if raw["model_type"] == "gemma" and raw.get("hidden_act") == "gelu":
        raw = {**raw, "hidden_act": "gelu_pytorch_tanh"}  # its release's name for it, as read
    gemma3 = raw["model_type"] == "gemma3_text"
    global_rope, local_theta = _gemma_rope(raw, gemma3)
    pattern = raw.get("sliding_window_pattern", GEMMA3_SLIDING_PATTERN) if gemma3 else 2
    scalar = raw.get("query_pre_attn_scalar")
    activation_key = "hidden_activation" if raw.get("hidden_activation") else "hidden_act"
    # Gemma 3 states its context already scaled (its global layers' linear factor included)
    stated = {"max_position_embeddings": raw.get("max_position_embeddings", DEFAULT_MAX_POSITIONS)}
    return decoder_config(
        global_rope,
        generation,
        **(stated if gemma3 else {}),
        hidden_act=require_activation(raw, activation_key, GELU_TANH),
        norm_weight_offset=1.0,
        embed_scale=raw["hidden_size"] ** 0.5,
        attention_scale=scalar**-0.5 if scalar else None,
        attn_logit_softcap=raw.get("attn_logit_softcapping") or 0.0,
        final_logit_softcap=raw.get("final_logit_softcapping") or 0.0,
        qk_norm=gemma3,
        local_rope_theta=local_theta,
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        layer_windows=typed_layer_windows(raw, lambda i: bool((i + 1) % pattern)),
    )


def read_gemma3_image_text_config(raw: dict, generation: dict) -> ModelConfig:
    """Gemma 3's image-text checkpoints (Gemma3ForConditionalGeneration) served as their text
    model: text_config with transformers' defaults filled in (the Hub's name only what differs
    from them), the checkpoint's own architecture, dtype, special tokens and tying kept."""
    from transformers import Gemma3TextConfig

    text = Gemma3TextConfig(**raw["text_config"]).to_dict()
    kept = ("architectures", "torch_dtype", "dtype", "eos_token_id", "bos_token_id")
    text |= {key: raw[key] for key in kept if raw.get(key)}
    # the image-text model ties its LM head by its own setting, not its text config's
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", True)
    return read_gemma_config(text, generation)


def _gemma_rope(raw: dict, gemma3: bool) -> tuple[dict, float | None]:
    """config.json with the global layers' rope settings in the usual keys, and (Gemma 3) the
    sliding layers' base: transformers 5 nests both by layer type in rope_parameters, older
    configs keep rope_theta / rope_scaling for the global layers and rope_local_base_freq."""
    parameters = raw.get("rope_parameters") or {}
    if "full_attention" in parameters:
        local = parameters.get("sliding_attention") or {}
        return {**raw, "rope_parameters": parameters["full_attention"]}, local.get("rope_theta")
    return raw, raw.get("rope_local_base_freq", 10000.0) if gemma3 else None


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


class GemmaMLP(LlamaMLP):
    def forward(self, x: torch.Tensor | FP8Rows) -> Product:
        gate_up = self.gate_up_proj(x, defer_scales=True)
        act = gelu_tanh_and_mul(gate_up, quantize_for=self.down_proj)
        return self.down_proj(act, defer_scales=True)


class GemmaDecoderLayer(LlamaDecoderLayer):
    mlp_class = GemmaMLP

    def fuses_decode(self) -> bool:
        return False


class Gemma2DecoderLayer(GemmaDecoderLayer):
    def __init__(
        self,
        config: ModelConfig,
        weights: Weights,
        prefix: str,
        backend: AttentionBackend,
        rotary: RotaryEmbedding,
        window: int,
    ) -> None:
        super().__init__(config, weights, prefix, backend, rotary, window)
        self.pre_feedforward_layernorm = rms_norm(
            weights, f"{prefix}.pre_feedforward_layernorm.weight", config
        )
        self.post_feedforward_layernorm = rms_norm(
            weights, f"{prefix}.post_feedforward_layernorm.weight", config
        )

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_norm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, positions, kv_cache, meta))
        mlp_input = self.mlp.gate_up_proj
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual, quantize_for=mlp_input)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class ScaledEmbedding(nn.Module):
    """The token embedding times `scale`, rounded to the embedding's dtype as transformers does."""

    def __init__(self, embedding: nn.Module, scale: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.embedding = embedding
        self.scale = torch.tensor(scale, dtype=dtype).item()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids) * self.scale


class GemmaForCausalLM(LlamaForCausalLM):
    layer_class = GemmaDecoderLayer

    def __init__(self, config: ModelConfig, weights: Weights, backend: AttentionBackend) -> None:
        super().__init__(config, weights, backend)
        if self.embed_tokens is not None:
            self.embed_tokens = ScaledEmbedding(self.embed_tokens, config.embed_scale, self.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcap
        return soft_cap(logits, cap) if cap else logits


class Gemma2ForCausalLM(GemmaForCausalLM):
    layer_class = Gemma2DecoderLayer


class Gemma3ForConditionalGeneration(Gemma2ForCausalLM):
    """The language model of a Gemma 3 image-text checkpoint (its tensors under
    language_model.model, its LM head tied to the embedding); the vision tower is not read."""

    def __init__(self, config: ModelConfig, weights: Weights, backend: AttentionBackend) -> None:
        weights.serve_as("language_model.model.", "model.")
        weights.serve_as("language_model.lm_head.", "lm_head.")
        super().__init__(config, weights, backend)
