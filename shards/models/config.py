"""The model facts the shard needs, read from config.json and generation_config.json.

Each family's reader (registered in shards/models/__init__.py) builds a ModelConfig; the
helpers here read the keys most families share.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardline.shards.layers.rope_scaling import scaled_context

DEFAULT_MAX_POSITIONS = 4096


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    layer_windows: tuple[int, ...]
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: torch.dtype | None
    # Per-family facts; the defaults are Llama's.
    hidden_act: str = "silu"
    norm_kind: str = "rms"  # "rms" or "layer" (LayerNorm); rms_norm_eps is its epsilon either way
    norm_weight_offset: float = 0.0  # RMSNorm scales by offset + weight (Gemma: 1)
    embed_scale: float = 1.0  # the token embeddings are multiplied by it (Gemma: sqrt(hidden))
    attention_scale: float | None = None  # the softmax scale; None: head_dim ** -0.5
    attn_logit_softcap: float = 0.0  # scores become cap * tanh(score / cap); 0: no cap
    final_logit_softcap: float = 0.0  # the same on the logits
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotary embedding
    local_rope_theta: float | None = None  # sliding-window layers' rope base; None: rope_theta
    alibi: bool = False  # ALiBi position biases instead of a rotary embedding
    parallel_blocks: bool = False  # attention and MLP read the same normed input, summed

    @property
    def architecture(self) -> str:
        return self.architectures[0]

    @property
    def softmax_scale(self) -> float:
        return self.attention_scale or self.head_dim**-0.5

    @property
    def rotates_by_sequence_length(self) -> bool:
        """Whether a token's rotation depends on its sequence's length (LongRoPE): a cached
        prompt block does not record it, so prefix caching is off for such a model."""
        return (self.rope_scaling or {}).get("rope_type") == "longrope"

    @classmethod
    def from_dir(cls, model_dir: Path, rope_override: dict | None = None) -> ModelConfig:
        """`rope_override` (see `rope_override`) replaces config.json's rope scaling."""
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no config.json")
        raw = json.loads(path.read_text())
        generation_path = model_dir / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
        return cls.from_dicts(with_rope_override(raw, rope_override), generation)

    @classmethod
    def from_dicts(cls, raw: dict, generation: dict) -> ModelConfig:
        """The config of config.json's family, read by that family's registered reader."""
        from shardline.shards.models import family_of  # the registry imports this module

        return family_of(raw).read_config(raw, generation)


def rope_override(scaling: str | None, factor: float | None) -> dict | None:
    """The rope scaling TGI's --rope-scaling / --rope-factor force upon a model: a kind alone
    scales by 1.0, a factor alone scales linearly; None when neither is set."""
    if scaling is None and factor is None:
        return None
    return {"rope_type": scaling or "linear", "factor": factor or 1.0}


def with_rope_override(raw: dict, override: dict | None) -> dict:
    """config.json with `override` in place of its rope scaling (Gemma 3: its global layers'),
    the rope base kept."""
    if override is None:
        return raw
    parameters = raw.get("rope_parameters") or {}
    if "full_attention" in parameters:
        full = {"rope_theta": parameters["full_attention"].get("rope_theta"), **override}
        return {**raw, "rope_parameters": {**parameters, "full_attention": full}}
    theta, _ = rope_parameters(raw)
    return {**raw, "rope_theta": theta, "rope_parameters": None, "rope_scaling": override}


def decoder_config(raw: dict, generation: dict, **facts: Any) -> ModelConfig:
    """A ModelConfig from the keys Llama-style configs share (hidden_size, num_attention_heads,
    ...); `facts` set or override fields (layer_windows sets sliding_window too)."""
    num_heads = raw["num_attention_heads"]
    num_layers = raw["num_hidden_layers"]
    rope_theta, rope_scaling = rope_parameters(raw)
    fields = dict(
        model_type=raw["model_type"],
        architectures=tuple(raw.get("architectures") or ()),
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=scaled_context(
            raw.get("max_position_embeddings", DEFAULT_MAX_POSITIONS), rope_scaling
        ),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=raw.get("attention_bias", False),
        o_proj_bias=raw.get("attention_bias", False),
        mlp_bias=raw.get("mlp_bias", False),
        layer_windows=(0,) * num_layers,
        eos_token_ids=eos_token_ids(raw, generation),
        bos_token_id=generation.get("bos_token_id", raw.get("bos_token_id")),
        torch_dtype=checkpoint_dtype(raw),
    )
    fields.update(facts)
    return ModelConfig(**fields, sliding_window=max(fields["layer_windows"], default=0) or None)


def first_key(raw: dict, *keys: str, default: object = None) -> Any:
    """The value of the first of `keys` config.json sets (a family's own name for a setting,
    then its older or Llama's names)."""
    return next((raw[key] for key in keys if raw.get(key) is not None), default)


def layer_norm_config(
    raw: dict, generation: dict, renamed: dict, bias: bool, **facts: Any
) -> ModelConfig:
    """A LayerNorm family's ModelConfig (GPT-2, BLOOM, Falcon): `renamed`, its own keys' values
    under Llama's names (hidden_size, num_attention_heads, ...), LayerNorms of its
    layer_norm_epsilon, `bias` on every projection, and its other `facts`."""
    return decoder_config(
        {**raw, **renamed},
        generation,
        rms_norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        norm_kind="layer",
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=bias,
        **facts,
    )


def require_activation(raw: dict, key: str, supported: tuple[str, ...]) -> str:
    activation = raw.get(key) or supported[0]
    if activation not in supported:
        raise ValueError(
            f"unsupported {key} {activation!r} for {raw.get('model_type')!r}; "
            f"supported: {', '.join(supported)}"
        )
    return activation


def refuse_rope_scaling(raw: dict, positions: str) -> None:
    """A model whose positions are `positions` (learned, ALiBi) has no rotary embedding to scale:
    rope scaling in config.json or forced by --rope-scaling / --rope-factor is refused."""
    if rope_parameters(raw)[1] is not None:
        raise ValueError(
            f"{raw.get('model_type')!r} has {positions}, no rotary embedding: rope scaling "
            "does not apply"
        )


def typed_layer_windows(raw: dict, sliding: Callable[[int], bool]) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention) from config.json's layer_types
    ("sliding_attention" / "full_attention", as transformers names them) or, where it has
    none, from `sliding(layer index)`."""
    num_layers = raw["num_hidden_layers"]
    window = raw.get("sliding_window") or 0
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if sliding(i) else "full_attention" for i in range(num_layers)
    ]
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types names {len(layer_types)} layers; the model has {num_layers}")
    return tuple(window if kind == "sliding_attention" else 0 for kind in layer_types)


def rope_parameters(raw: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from the old keys (rope_theta, rope_scaling) or transformers 5's
    rope_parameters; scaling is None for plain RoPE and always names its kind in 'rope_type',
    and the original context length and factor where its kind uses them, as transformers
    fills them in (rope_scaling.py reads it)."""
    parameters = dict(raw.get("rope_parameters") or {})
    parameters.update(raw.get("rope_scaling") or {})
    theta = raw.get("rope_theta") or parameters.pop("rope_theta", 10000.0)
    parameters.pop("rope_theta", None)
    rope_type = parameters.pop("rope_type", None) or parameters.pop("type", None) or "default"
    parameters.pop("type", None)
    if rope_type == "default":
        return float(theta), None
    return float(theta), {
        "rope_type": rope_type,
        **parameters,
        **_rope_lengths(raw, rope_type, parameters),
    }


def _rope_lengths(raw: dict, rope_type: str, parameters: dict) -> dict:
    """Dynamic NTK counts from max_position_embeddings; the others from the original length
    (a top-level original_max_position_embeddings first: Phi-3 keeps it there)."""
    max_positions = raw.get("max_position_embeddings", DEFAULT_MAX_POSITIONS)
    original = max_positions
    if rope_type != "dynamic":
        original = (
            raw.get("original_max_position_embeddings")
            or parameters.get("original_max_position_embeddings")
            or max_positions
        )
    return {
        "original_max_position_embeddings": original,
        "factor": parameters.get("factor") or max_positions / original,
    }


def eos_token_ids(raw: dict, generation: dict) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (raw.get("eos_token_id"), generation.get("eos_token_id")):
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def checkpoint_dtype(raw: dict) -> torch.dtype | None:
    return _dtype_named(raw.get("torch_dtype") or raw.get("dtype"))


def _dtype_named(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None
