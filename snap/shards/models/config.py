"""The model facts the shard needs, read from config.json and generation_config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
QWEN2_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config default


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

    @property
    def architecture(self) -> str:
        return self.architectures[0]

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no config.json")
        raw = json.loads(path.read_text())
        generation_path = model_dir / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
        return cls.from_dicts(raw, generation)

    @classmethod
    def from_dicts(cls, raw: dict, generation: dict) -> ModelConfig:
        architectures = tuple(raw.get("architectures") or ())
        _check_supported(architectures, raw)
        num_heads = raw["num_attention_heads"]
        model_type = raw["model_type"]
        qkv_bias = raw.get("attention_bias", model_type == "qwen2")
        rope_theta, rope_scaling = _rope(raw)
        layer_windows = _layer_windows(raw)
        return cls(
            model_type=model_type,
            architectures=architectures,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=qkv_bias,
            o_proj_bias=qkv_bias and model_type != "qwen2",
            mlp_bias=raw.get("mlp_bias", False),
            sliding_window=max(layer_windows) or None,
            layer_windows=layer_windows,
            eos_token_ids=_eos_ids(raw, generation),
            bos_token_id=generation.get("bos_token_id", raw.get("bos_token_id")),
            torch_dtype=_dtype(raw.get("torch_dtype") or raw.get("dtype")),
        )


def _check_supported(architectures: tuple[str, ...], raw: dict) -> None:
    if not architectures or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {list(architectures)!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"unsupported hidden_act {activation!r}; only 'silu' is supported")


def _rope(raw: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from the old keys (rope_theta, rope_scaling) or transformers 5's
    rope_parameters; scaling is None for plain RoPE and always names its kind in 'rope_type'."""
    parameters = dict(raw.get("rope_parameters") or {})
    parameters.update(raw.get("rope_scaling") or {})
    theta = raw.get("rope_theta") or parameters.pop("rope_theta", 10000.0)
    parameters.pop("rope_theta", None)
    rope_type = parameters.pop("rope_type", None) or parameters.pop("type", None) or "default"
    parameters.pop("type", None)
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **parameters}


def _layer_windows(raw: dict) -> tuple[int, ...]:
    """Each layer's sliding window, 0 for full attention, as transformers reads the config:
    Mistral slides in every layer; Qwen2 only with use_sliding_window, in the layers that
    layer_types marks "sliding_attention" (by default those from max_window_layers on)."""
    num_layers = raw["num_hidden_layers"]
    window = raw.get("sliding_window") or 0
    model_type = raw.get("model_type")
    if model_type == "mistral":
        return (window,) * num_layers
    if model_type != "qwen2" or not raw.get("use_sliding_window", False):
        return (0,) * num_layers
    first_sliding = raw.get("max_window_layers", QWEN2_MAX_WINDOW_LAYERS)
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)
    ]
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types names {len(layer_types)} layers; the model has {num_layers}")
    return tuple(window if kind == "sliding_attention" else 0 for kind in layer_types)


def _eos_ids(raw: dict, generation: dict) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (raw.get("eos_token_id"), generation.get("eos_token_id")):
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None
