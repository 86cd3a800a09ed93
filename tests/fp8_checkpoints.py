"""A tiny model's weights written as the FP8 checkpoints people publish, and their twins.

Each format quantizes the decoder layers' projections the way its tools do and writes the
tensors and `quantization_config` under their names; `write_dequantized_twin` writes a
checkpoint's FP8 weights back in float32 (each weight times its scales), the unquantized model
a correct loader must match.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
KV_SCALE_NAMES = ("k_scale", "v_scale")
BLOCK = (24, 24)  # not a divisor of the tiny model's sizes: partial blocks at the edges

Quantized = dict[str, torch.Tensor]


def _quantizes(name: str, tensor: torch.Tensor, quantization_config: dict) -> bool:
    """A decoder projection; the LM head too where the config's ignore list leaves it out."""
    if name == "lm_head.weight":
        return "lm_head" not in quantization_config.get("ignore", ["lm_head"])
    return ".layers." in name and name.endswith("_proj.weight") and tensor.dim() == 2


def _scaled(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _per_channel(weight: torch.Tensor, scale_dtype: torch.dtype) -> Quantized:
    scale = (weight.abs().amax(dim=1, keepdim=True) / FP8_MAX).to(scale_dtype)
    return {"weight": _scaled(weight, scale.float()), "weight_scale": scale}


def _per_tensor(weight: torch.Tensor) -> Quantized:
    scale = (weight.abs().amax() / FP8_MAX).reshape(1)
    return {"weight": _scaled(weight, scale), "weight_scale": scale}


def _per_block(weight: torch.Tensor, scale_name: str = "weight_scale_inv") -> Quantized:
    rows, cols = BLOCK
    n, k = weight.shape
    padded = torch.zeros(-(-n // rows) * rows, -(-k // cols) * cols)
    padded[:n, :k] = weight
    blocks = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    per_element = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k]
    return {"weight": _scaled(weight, per_element), scale_name: scale}


def compressed_tensors_config(strategy: str, ignore=("lm_head",), **weights: object) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": list(ignore),
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": strategy,
                    "dynamic": False,
                    **weights,
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "token",
                    "dynamic": True,
                },
            }
        },
    }


FORMATS: dict[str, tuple[Callable[[torch.Tensor], Quantized], dict]] = {
    "compressed-tensors-channel": (
        lambda w: _per_channel(w, torch.bfloat16),
        compressed_tensors_config("channel"),
    ),
    "compressed-tensors-tensor": (_per_tensor, compressed_tensors_config("tensor")),
    # llm-compressor with the LM head among its targets (nothing ignored)
    "compressed-tensors-channel-head": (
        lambda w: _per_channel(w, torch.bfloat16),
        compressed_tensors_config("channel", ignore=()),
    ),
    "compressed-tensors-block": (
        lambda w: _per_block(w, "weight_scale"),
        compressed_tensors_config("block", block_structure=list(BLOCK)),
    ),
    "fbgemm_fp8": (
        lambda w: _per_channel(w, torch.float32),
        {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
    ),
    "fp8-block": (
        _per_block,
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)},
    ),
}


def _rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    shutil.copytree(src, dst)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def write_fp8_checkpoint(src: Path, dst: Path, fmt: str) -> Path:
    """`src`'s weights with each decoder projection (and the LM head where the format's config
    does not ignore it) quantized as `fmt` (a FORMATS key)."""
    quantize, quantization_config = FORMATS[fmt]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(src / "model.safetensors").items():
        if not _quantizes(name, tensor, quantization_config):
            tensors[name] = tensor
            continue
        prefix = name.removesuffix(".weight")
        for suffix, part in quantize(tensor.float()).items():
            tensors[f"{prefix}.{suffix}"] = part.contiguous()
    config = json.loads((src / "config.json").read_text())
    return _rewrite(src, dst, tensors, {**config, "quantization_config": quantization_config})


def is_blocked(quantization_config: dict) -> bool:
    weights = quantization_config.get("config_groups", {}).get("group_0", {}).get("weights", {})
    return "weight_block_size" in quantization_config or weights.get("strategy") == "block"


def dequantize(tensors: dict[str, torch.Tensor], prefix: str, blocked: bool) -> torch.Tensor:
    weight = tensors[f"{prefix}.weight"].float()
    scale_name = f"{prefix}.weight_scale_inv"
    scale = tensors.get(scale_name, tensors.get(f"{prefix}.weight_scale")).float()
    if blocked:
        rows, cols = BLOCK
        per_element = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
        return weight * per_element[: weight.shape[0], : weight.shape[1]]
    return weight * (scale if scale.dim() == 2 else scale.expand(weight.shape[0], 1))


def write_dequantized_twin(src: Path, dst: Path) -> Path:
    """`src` (an FP8 checkpoint) with every FP8 weight dequantized to float32 and no
    quantization_config."""
    tensors = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    blocked = is_blocked(config.pop("quantization_config"))
    twin = {
        name: dequantize(tensors, name.removesuffix(".weight"), blocked)
        if tensor.dtype == FP8
        else tensor
        for name, tensor in tensors.items()
        if "_scale" not in name.rsplit(".", 1)[-1]
    }
    return _rewrite(src, dst, twin, config)


def add_kv_scales(
    src: Path, dst: Path, k_scale: float, v_scale: float, names: tuple[str, str] = KV_SCALE_NAMES
) -> Path:
    """`src` with per-tensor k / v scales in every attention layer, as llm-compressor writes an
    FP8 KV-cache scheme (AutoFP8: k_proj.output_scale, v_proj.output_scale)."""
    tensors = load_file(src / "model.safetensors")
    layers = {name.split(".self_attn.")[0] for name in tensors if ".self_attn." in name}
    for layer in layers:
        tensors[f"{layer}.self_attn.{names[0]}"] = torch.tensor(k_scale)
        tensors[f"{layer}.self_attn.{names[1]}"] = torch.tensor(v_scale)
    return _rewrite(src, dst, tensors, json.loads((src / "config.json").read_text()))
