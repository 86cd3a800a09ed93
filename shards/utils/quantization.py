"""Which FP8 weight format a model is served in: its checkpoint's, detected from config.json's
`quantization_config`, or its full-precision weights quantized at load (`--quantize fp8`).

Checkpoint formats read as published:
- compressed-tensors (`*-FP8`, `*-FP8-dynamic` releases of llm-compressor): float8_e4m3fn
  `weight` with a per-channel [N, 1], per-tensor or (FP8_BLOCK) per-block `weight_scale`;
- fbgemm_fp8 (Meta's Llama 3.1 FP8): float8_e4m3fn `weight`, per-channel `weight_scale`;
- fp8 (transformers' fine-grained FP8, as Qwen3 and DeepSeek ship it): float8_e4m3fn `weight`
  with one `weight_scale_inv` per block of weight_block_size (128 x 128).
Activations are quantized per token at run time whatever the checkpoint says (a static input
scale is not used). Any other `quant_method` is refused with a message naming it.

The LM head is read as stored: a checkpoint that quantizes it (compressed-tensors targeting
`lm_head`) serves it in FP8, others in full precision, as `--quantize fp8` leaves it, like vLLM
and TGI. SHARDLINE_FP8_LM_HEAD=1 quantizes it at load too (as SGLang's
SGLANG_QUANTIZE_LM_HEAD_FP8): the 8B's largest single read of a decode step halved.

No torch here: the launcher checks a model's format before it starts the shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shardline.shard_config import QUANTIZE_CHOICES

CHECKPOINT_METHODS = ("compressed-tensors", "fbgemm_fp8", "fp8")
FP8_LM_HEAD_VARIABLE = "SHARDLINE_FP8_LM_HEAD"


class UnsupportedQuantizationError(ValueError):
    """A checkpoint quantized in a way Shardline does not load."""


@dataclass(frozen=True)
class WeightFormat:
    method: str  # reported by /info as `quantize`
    # The tensor beside each `<layer>.weight` that holds its scales; None: quantized at load.
    scale_suffix: str | None = None
    block: tuple[int, int] | None = None  # the (rows, columns) of one scale's block
    lm_head_at_load: bool = False  # a full-precision LM head quantized at load too

    @property
    def description(self) -> str:
        head = "; LM head quantized at load" if self.lm_head_at_load else ""
        if self.scale_suffix is None:
            return f"fp8 weights quantized at load (per output channel{head})"
        layout = f"{self.block[0]}x{self.block[1]} blocks" if self.block else "channel or tensor"
        return f"{self.method} FP8 checkpoint ({layout} weight scales{head})"


AT_LOAD = WeightFormat("fp8")


def fp8_lm_head_asked() -> bool:
    return os.environ.get(FP8_LM_HEAD_VARIABLE, "").strip().lower() in ("1", "true")


def weight_format(model_dir: Path, quantize: str | None) -> WeightFormat | None:
    """The FP8 format of the model's linear layers, None for unquantized weights."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise UnsupportedQuantizationError(
            f"quantization {quantize!r} is not supported; choose one of {QUANTIZE_CHOICES}"
        )
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    quantization_config = config.get("quantization_config")
    method = None if quantization_config is None else quantization_config.get("quant_method")
    if quantize not in (None, "fp8", method):  # a checkpoint format names what it expects
        raise UnsupportedQuantizationError(
            f"quantization {quantize!r}: {model_dir} is quantized with {method!r}"
        )
    if quantization_config is None:
        fmt = AT_LOAD if quantize == "fp8" else None
    else:
        fmt = checkpoint_format(quantization_config)
    return fmt and replace(fmt, lm_head_at_load=fp8_lm_head_asked())


def checkpoint_format(quantization_config: dict[str, Any]) -> WeightFormat:
    method = quantization_config.get("quant_method")
    if method == "compressed-tensors":
        return WeightFormat(method, "weight_scale", _compressed_tensors_block(quantization_config))
    if method == "fbgemm_fp8":
        return WeightFormat(method, "weight_scale")
    if method == "fp8":
        return _fine_grained(quantization_config)
    raise UnsupportedQuantizationError(
        f"checkpoint quantization {method!r} is not supported: Shardline loads the FP8 formats "
        f"{', '.join(CHECKPOINT_METHODS)}, and quantizes full-precision weights with "
        "--quantize fp8"
    )


def _fine_grained(quantization_config: dict[str, Any]) -> WeightFormat:
    block = quantization_config.get("weight_block_size")
    if not block or len(block) != 2:
        raise UnsupportedQuantizationError(
            f"fp8 checkpoint without a 2-D weight_block_size (got {block!r}) is not supported"
        )
    scheme = quantization_config.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise UnsupportedQuantizationError(
            f"fp8 checkpoint with activation_scheme {scheme!r} is not supported (only dynamic)"
        )
    return WeightFormat("fp8", "weight_scale_inv", (int(block[0]), int(block[1])))


def _compressed_tensors_block(quantization_config: dict[str, Any]) -> tuple[int, int] | None:
    """The weight scales' block (FP8_BLOCK schemes), None for channel or tensor scales: the same
    in every group, each of float 8-bit weights (compressed-tensors' own reading of the config)
    and activations, if quantized, to 8-bit floats."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    config = QuantizationConfig.model_validate(quantization_config)
    blocks = set()
    for name, scheme in config.config_groups.items():
        problems = _group_problems(scheme, scheme.format or config.format)
        if problems:
            raise UnsupportedQuantizationError(
                f"compressed-tensors group {name!r} is not supported ({'; '.join(problems)}): "
                "Shardline loads float-quantized FP8 weights with channel, tensor or block scales"
            )
        weights = scheme.weights
        block = weights.block_structure if weights.strategy == QuantizationStrategy.BLOCK else None
        blocks.add(None if block is None else (int(block[0]), int(block[1])))
    if len(blocks) > 1:
        raise UnsupportedQuantizationError(
            f"compressed-tensors groups with different weight scales ({blocks}) are not supported"
        )
    return blocks.pop() if blocks else None


def _group_problems(scheme: Any, group_format: str | None) -> list[str]:
    from compressed_tensors.quantization import QuantizationStrategy, QuantizationType

    weights, inputs = scheme.weights, scheme.input_activations
    scales = (QuantizationStrategy.CHANNEL, QuantizationStrategy.TENSOR, QuantizationStrategy.BLOCK)
    problems = []
    if group_format != "float-quantized":
        problems.append(f"format {group_format!r}")
    if weights is None or weights.num_bits != 8 or weights.type != QuantizationType.FLOAT:
        problems.append("weights other than 8-bit floats")
    elif weights.strategy not in scales:
        problems.append(f"weight strategy {weights.strategy.value!r}")
    elif weights.strategy == QuantizationStrategy.BLOCK and len(weights.block_structure or ()) != 2:
        problems.append(f"block structure {weights.block_structure!r}")
    if inputs is not None and (inputs.num_bits != 8 or inputs.type != QuantizationType.FLOAT):
        problems.append("activations other than 8-bit floats")
    return problems
