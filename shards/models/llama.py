"""The Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2) with tensor parallelism.

Heads are split across ranks; when there are more ranks than KV heads, each KV head is
replicated so that every rank holds exactly one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from shardline.shards.layers import custom_kernels
from shardline.shards.layers.activation import silu_and_mul
from shardline.shards.layers.attention import AttentionBackend, AttentionMetadata
from shardline.shards.layers.attention.fp8_kv import KVScales
from shardline.shards.layers.attention.layer import PagedAttention
from shardline.shards.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardline.shards.layers.fp8 import FP8Rows, Product, ScaledProduct
from shardline.shards.layers.gemv_plan import Epilogue, RopeKV, weight_tiling
from shardline.shards.layers.linear import ColumnParallelLinear, RowParallelLinear
from shardline.shards.layers.norm import RMSNorm
from shardline.shards.layers.rotary import RotaryEmbedding
from shardline.shards.models.causal_lm import CausalLMBase
from shardline.shards.models.config import (
    ModelConfig,
    decoder_config,
    require_activation,
    typed_layer_windows,
)
from shardline.shards.models.heads import kv_heads_per_rank
from shardline.shards.models.stages import send_on, stage_input, stage_layers
from shardline.shards.utils.fp8_weights import read_linear, stack_rows
from shardline.shards.utils.weights import Weights

KVCache = tuple[torch.Tensor, torch.Tensor]


logger = logging.getLogger(__name__)

QWEN2_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config default


def read_llama_config(raw: dict, generation: dict) -> ModelConfig:
    """Llama, Mistral and Qwen2 (q/k/v biases by default, no o_proj bias), all SiLU."""
    model_type = raw["model_type"]
    qkv_bias = raw.get("attention_bias", model_type == "qwen2")
    return decoder_config(
        raw,
        generation,
        hidden_act=require_activation(raw, "hidden_act", ("silu",)),
        attention_bias=qkv_bias,
        o_proj_bias=qkv_bias and model_type != "qwen2",
        layer_windows=_llama_windows(raw),
    )


def _llama_windows(raw: dict) -> tuple[int, ...]:
    """Mistral slides in every layer; Qwen2 and Qwen3 only with use_sliding_window, in the
    layers that layer_types marks (by default those from max_window_layers on); Llama never."""
    model_type = raw["model_type"]
    if model_type == "mistral":
        return typed_layer_windows(raw, lambda i: True)
    if model_type not in ("qwen2", "qwen3") or not raw.get("use_sliding_window", False):
        return (0,) * raw["num_hidden_layers"]
    first_sliding = raw.get("max_window_layers", QWEN2_MAX_WINDOW_LAYERS)
    return typed_layer_windows(raw, lambda i: i >= first_sliding)


def rms_norm(weights: Weights, name: str, config: ModelConfig) -> RMSNorm:
    """The RMSNorm of weight `name`, scaling by config.norm_weight_offset + weight."""
    weight = weights.get_tensor(name)
    return RMSNorm(
        weight + config.norm_weight_offset if config.norm_weight_offset else weight,
        config.rms_norm_eps,
    )


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        weights: Weights,
        prefix: str,
        backend: AttentionBackend,
        rotary: RotaryEmbedding,
        window: int,
    ) -> None:
        super().__init__()
        tp = weights.tp
        self.head_dim = config.head_dim
        self.num_heads = config.num_heads // tp.world_size
        self.num_kv_heads = kv_heads_per_rank(config.num_kv_heads, tp.world_size)
        self.attention = PagedAttention(
            backend,
            self.num_heads,
            config.head_dim,
            scale=config.softmax_scale,
            softcap=config.attn_logit_softcap,
            rotary=rotary,
            window=window,
            kv_scales=KVScales.load(weights, prefix),
        )
        self.q_norm = (
            rms_norm(weights, f"{prefix}.q_norm.weight", config) if config.qk_norm else None
        )
        self.k_norm = (
            rms_norm(weights, f"{prefix}.k_norm.weight", config) if config.qk_norm else None
        )
        self.qkv_proj = self._load_qkv(config, weights, prefix)
        self.o_proj = RowParallelLinear.load(weights, f"{prefix}.o_proj", config.o_proj_bias)

    def _load_qkv(self, config: ModelConfig, weights: Weights, prefix: str) -> ColumnParallelLinear:
        """q rows of this rank's heads, then k and v rows of this rank's KV heads, stacked."""
        first_kv = weights.tp.rank * config.num_kv_heads // weights.tp.world_size
        kv_rows = (first_kv * self.head_dim, (first_kv + self.num_kv_heads) * self.head_dim)

        def stacked(kind: str) -> torch.Tensor:
            q = weights.get_sharded(f"{prefix}.q_proj.{kind}", dim=0)
            k = weights.get_range(f"{prefix}.k_proj.{kind}", 0, *kv_rows)
            v = weights.get_range(f"{prefix}.v_proj.{kind}", 0, *kv_rows)
            return torch.cat([q, k, v], dim=0)

        bias = stacked("bias") if config.attention_bias else None
        weight = stack_rows(
            [
                read_linear(weights, f"{prefix}.q_proj", 0),
                read_linear(weights, f"{prefix}.k_proj", 0, kv_rows),
                read_linear(weights, f"{prefix}.v_proj", 0, kv_rows),
            ]
        )
        return ColumnParallelLinear(weight.weight, bias, weight.scale)

    def forward(
        self,
        hidden: torch.Tensor | FP8Rows,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> Product:
        """o_proj's output (a ScaledProduct where it can be: the RMSNorm after it applies the
        scales); qkv's scales go to the rotary + KV write the same way."""
        qkv = self.qkv_proj(hidden, defer_scales=True)
        return self.o_proj(self.attend(qkv, positions, kv_cache, meta), defer_scales=True)

    def attend(
        self,
        qkv: Product,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        written: bool = False,
    ) -> torch.Tensor:
        """The attention output [T, heads * head_dim] (before o_proj) of the qkv projection
        (`written`: made with `rope_kv`, see PagedAttention; a ScaledProduct's scales applied by
        the attention's rotary + KV write where it can, else here)."""
        qkv_scales = None
        if isinstance(qkv, ScaledProduct):
            if self.q_norm is None and self.attention.takes_qkv_scales(kv_cache):
                qkv_scales, qkv = (qkv.row_scale, qkv.col_scale), qkv.raw
            else:
                qkv = qkv.value()
        num_tokens = qkv.shape[0]
        heads = qkv.view(num_tokens, -1, self.head_dim)
        q, k, v = heads.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.attention(q, k, v, positions, kv_cache, meta, written, qkv_scales)

    def rope_kv(
        self, positions: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> RopeKV | None:
        """PagedAttention.rope_kv where the batch-1 qkv GEMV can take it: no q/k norms sit
        between the projection and the rotation."""
        if self.q_norm is not None or weight_tiling(self.qkv_proj.weight, Epilogue.ROPE_KV) is None:
            return None
        return self.attention.rope_kv(positions, kv_cache, meta)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, weights: Weights, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = self._load_gate_up(config, weights, prefix)
        self.down_proj = RowParallelLinear.load(weights, f"{prefix}.down_proj", config.mlp_bias)

    def forward(self, x: torch.Tensor | FP8Rows) -> Product:
        """down_proj's output (a ScaledProduct where it can be, for the next RMSNorm); gate_up's
        scales go to SiLU * up the same way."""
        gate_up = self.gate_up_proj(x, defer_scales=True)
        return self.down_proj(silu_and_mul(gate_up, quantize_for=self.down_proj), defer_scales=True)

    def _load_gate_up(
        self, config: ModelConfig, weights: Weights, prefix: str
    ) -> ColumnParallelLinear:
        """This rank's gate rows, then its up rows."""
        return ColumnParallelLinear.load(
            weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], config.mlp_bias
        )


class LlamaDecoderLayer(nn.Module):
    attention_class = LlamaAttention
    mlp_class = LlamaMLP

    def __init__(
        self,
        config: ModelConfig,
        weights: Weights,
        prefix: str,
        backend: AttentionBackend,
        rotary: RotaryEmbedding,
        window: int,
    ) -> None:
        super().__init__()
        self.input_layernorm = rms_norm(weights, f"{prefix}.input_layernorm.weight", config)
        self.self_attn = self.attention_class(
            config, weights, f"{prefix}.self_attn", backend, rotary, window
        )
        self.post_attention_layernorm = rms_norm(
            weights, f"{prefix}.post_attention_layernorm.weight", config
        )
        self.mlp = self.mlp_class(config, weights, f"{prefix}.mlp")

    def forward(
        self,
        hidden: Product,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[Product, torch.Tensor]:
        hidden, residual = self.input_norm(hidden, residual)
        hidden = self.self_attn(hidden, positions, kv_cache, meta)
        mlp_input = self.mlp.gate_up_proj
        hidden, residual = self.post_attention_layernorm(hidden, residual, quantize_for=mlp_input)
        return self.mlp(hidden), residual

    def input_norm(
        self, hidden: Product, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor | FP8Rows, torch.Tensor]:
        """The attention's input (its qkv projection's only input, hence quantized for it where
        that is FP8) and the residual stream: the first layer (no residual yet) norms the hidden
        states, which become the residual; a later one adds the residual to them and norms the
        sum in one fused step."""
        qkv = self.self_attn.qkv_proj
        if residual is None:
            return self.input_layernorm(hidden, quantize_for=qkv), hidden
        return self.input_layernorm(hidden, residual, quantize_for=qkv)

    def fuses_decode(self) -> bool:
        """Whether the fused one-row kernels tile every projection of this layer (FP8 ones on
        a GPU that converts FP8)."""
        from shardline.shards.layers.fp8 import has_fp8_tensor_cores

        attn, mlp = self.self_attn, self.mlp
        return all(
            (proj.weight_scale is None or has_fp8_tensor_cores(proj.weight.device))
            and weight_tiling(proj.weight, epilogue) is not None
            for proj, epilogue in [
                (attn.qkv_proj, Epilogue.PLAIN),
                (attn.o_proj, Epilogue.RESIDUAL),
                (mlp.gate_up_proj, Epilogue.SILU_PAIRS),
                (mlp.down_proj, Epilogue.RESIDUAL),
            ]
        )

    def decode_one(
        self,
        residual: torch.Tensor,
        ss_in: torch.Tensor | None,
        ss: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The layer on one token's residual stream [1, hidden] with the norms and SiLU * up
        folded into the GEMVs; returns the new residual. `ss_in` holds the residual's sum of
        squares (None: the first layer norms it itself); this layer accumulates its two sums of
        squares into `ss` [2], zeroing each slot before (triton_gemv.py)."""
        from shardline.shards.layers.triton_gemv import gemv, gemv_normed, gemv_residual

        attn, mlp = self.self_attn, self.mlp
        norm = self.input_layernorm
        qkv, bias, scale = attn.qkv_proj.weight, attn.qkv_proj.bias, attn.qkv_proj.weight_scale
        rope_kv = attn.rope_kv(positions, kv_cache, meta)
        if ss_in is None:
            heads = gemv(norm(residual), qkv, bias, zero=ss[0], scale=scale, rope_kv=rope_kv)
        else:
            heads = gemv_normed(
                residual, ss_in, norm.weight, norm.eps, qkv, bias, zero=ss[0], scale=scale,
                rope_kv=rope_kv,
            )  # fmt: skip
        out = attn.attend(heads, positions, kv_cache, meta, written=rope_kv is not None)
        o_proj = attn.o_proj
        residual = gemv_residual(
            out, o_proj.weight, residual, ss[0], o_proj.bias, o_proj.weight_scale
        )
        norm = self.post_attention_layernorm
        gate_up, down = mlp.gate_up_proj, mlp.down_proj
        act = gemv_normed(
            residual, ss[0], norm.weight, norm.eps, gate_up.weight, gate_up.bias, True, ss[1],
            gate_up.weight_scale,
        )  # fmt: skip
        return gemv_residual(act, down.weight, residual, ss[1], down.bias, down.weight_scale)


class LlamaForCausalLM(CausalLMBase):
    layer_class = LlamaDecoderLayer

    def __init__(self, config: ModelConfig, weights: Weights, backend: AttentionBackend) -> None:
        super().__init__(config, weights)
        stage = self.stage
        self.embed_tokens = (
            VocabParallelEmbedding(weights, "model.embed_tokens.weight") if stage.is_first else None
        )
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            weights.dtype,
            weights.device,
        )
        # Gemma 3's sliding-window layers rotate with their own base, unscaled
        local_rotary = self.rotary
        if config.local_rope_theta is not None:
            local_rotary = RotaryEmbedding(
                config.head_dim,
                config.max_position_embeddings,
                config.local_rope_theta,
                None,
                weights.dtype,
                weights.device,
            )
        self.layers = stage_layers(
            stage,
            config.num_layers,
            lambda i: self.layer_class(
                config,
                weights,
                f"model.layers.{i}",
                backend,
                local_rotary if config.layer_windows[i] else self.rotary,
                config.layer_windows[i],
            ),
            logger,
        )
        self.num_layers = len(self.layers)
        if stage.is_last:
            self.norm = rms_norm(weights, "model.norm.weight", config)
            head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
            self.lm_head = ParallelLMHead(weights, head, config.vocab_size)
        # Batch-1 decode folds the norms and SiLU * up into the one-row GEMVs on a single
        # half-precision GPU (with more ranks an all-reduce sits before each residual add).
        self.fused_decode = (
            weights.tp.world_size == 1
            and stage.size == 1
            and torch.device(weights.device).type == "cuda"
            and weights.dtype in (torch.bfloat16, torch.float16)
            and not custom_kernels.disabled()
            and all(layer.fuses_decode() for layer in self.layers)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states [T, hidden_size] of the packed tokens (on a pipeline stage
        but the last, those it sent on; see shards/models/stages.py)."""
        positions = self.rotary.rows(positions, meta)  # LongRoPE: the long factors' rows
        if self.fused_decode and input_ids.shape[0] == 1:
            return self._decode_one(input_ids, positions, kv_caches, meta)
        hidden, residual = stage_input(
            self.stage, self.embed_tokens, input_ids, self.config.hidden_size, self.dtype, True
        )
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, positions, kv_cache, meta)
        if not self.stage.is_last:
            return send_on(self.stage, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _decode_one(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        residual = self.embed_tokens(input_ids)
        # per layer the sums of squares of the residual after attention and after the MLP
        ss = torch.empty((self.num_layers, 2), dtype=torch.float32, device=residual.device)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            ss_in = ss[i - 1, 1] if i else None
            residual = layer.decode_one(residual, ss_in, ss[i], positions, kv_cache, meta)
        return self.norm(residual)
