"""A linear layer's weight as this rank holds it: plain, or FP8 with one scale per output row.

`read_linear` reads rows or columns [start, stop) of `<prefix>.weight` in the model's FP8 format
(`Weights.quantization`, see quantization.py), this rank's shard by default:
- unquantized model: the plain tensor in the model's dtype;
- quantized at load: the full-precision rows quantized per output row (fp8.quantize_rows);
- channel or tensor scaled checkpoint: the stored FP8 weight and its scales, as they are;
- block-scaled checkpoint: the blocks dequantized in float32, then quantized per output row.
Row scales always come from whole rows, whatever the split: a column shard (row-parallel layer)
takes its columns of the rows quantized whole, so every tensor-parallel size holds the same
FP8 values and scales. A layer a checkpoint left unquantized (its `ignore` list) stays plain.
`read_lm_head` reads the LM head's vocabulary rows: FP8 where stored so or asked for at load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardline.shards.layers.fp8 import FP8, SCALED_MM_ALIGNMENT, dequantize_rows, quantize_rows
from shardline.shards.utils.quantization import WeightFormat
from shardline.shards.utils.weights import Weights


@dataclass(frozen=True)
class LinearWeight:
    weight: torch.Tensor  # [N, K]: the model's dtype, or float8_e4m3fn
    scale: torch.Tensor | None = None  # float32 [N] with an FP8 weight


def read_linear(
    weights: Weights, prefix: str, dim: int, bounds: tuple[int, int] | None = None
) -> LinearWeight:
    """`prefix.weight`'s [start, stop) along `dim` (0: output rows, 1: input columns)."""
    name = f"{prefix}.weight"
    start, stop = bounds or weights.shard_bounds(name, dim)
    fmt = weights.quantization
    if fmt is None:
        return LinearWeight(weights.get_range(name, dim, start, stop))
    stored_fp8 = _stored_dtype(weights, name) == FP8
    if fmt.scale_suffix is not None and not stored_fp8:
        return LinearWeight(weights.get_range(name, dim, start, stop))
    if stored_fp8 and fmt.block is None:
        return _stored_with_row_scales(weights, prefix, fmt, dim, start, stop)
    rows = (start, stop) if dim == 0 else (0, weights.shape(name)[0])
    if stored_fp8:
        full_precision = _dequantized_blocks(weights, prefix, fmt, *rows)
    else:
        full_precision = weights.get_stored(name, 0, *rows)
    quantized, scale = quantize_rows(full_precision)
    if dim == 1:
        quantized = quantized[:, start:stop].contiguous()
    return LinearWeight(quantized, scale)


def read_lm_head(weights: Weights, name: str) -> LinearWeight:
    """This rank's rows of the LM head `name` (zero rows past the vocabulary, see
    Weights.get_sharded): FP8 as a checkpoint stores it, or quantized at load where the format
    asks (`lm_head_at_load`); plain otherwise, and where this rank's rows are not a multiple of
    the FP8 GEMM's alignment (the stored FP8 values dequantized)."""
    fmt = weights.quantization
    rows = -(-weights.shape(name)[0] // weights.tp.world_size)
    aligned = rows % SCALED_MM_ALIGNMENT == 0
    stored_fp8 = fmt is not None and fmt.scale_suffix is not None
    stored_fp8 = stored_fp8 and _stored_dtype(weights, name) == FP8
    if not stored_fp8 and not (fmt is not None and fmt.lm_head_at_load and aligned):
        return LinearWeight(weights.get_sharded(name, dim=0, pad=True))
    start, stop = weights.shard_bounds(name, 0, pad=True)
    if stored_fp8:
        head = read_linear(weights, name.removesuffix(".weight"), 0, (start, stop))
    else:
        head = _as_fp8(LinearWeight(weights.get_range(name, 0, start, stop)))
    if not aligned:  # stored FP8 only
        head = LinearWeight(dequantize_rows(head.weight, head.scale).to(weights.dtype))
    return _zero_rows_to(head, rows)


def _zero_rows_to(part: LinearWeight, rows: int) -> LinearWeight:
    missing = rows - part.weight.shape[0]
    if not missing:
        return part
    weight = torch.cat([part.weight, part.weight.new_zeros(missing, part.weight.shape[1])])
    if part.scale is None:
        return LinearWeight(weight)
    return LinearWeight(weight, torch.cat([part.scale, part.scale.new_ones(missing)]))


def stack_rows(parts: Sequence[LinearWeight]) -> LinearWeight:
    """Layers whose outputs are stacked (q, k, v; gate, up) as one; a plain part among FP8 ones
    is quantized like them."""
    if all(part.scale is None for part in parts):
        return LinearWeight(torch.cat([part.weight for part in parts]))
    quantized = [_as_fp8(part) for part in parts]
    return LinearWeight(
        torch.cat([part.weight for part in quantized]),
        torch.cat([part.scale for part in quantized if part.scale is not None]),
    )


def _stored_dtype(weights: Weights, name: str) -> torch.dtype:
    return weights.get_stored(name, 0, 0, 0).dtype  # an empty slice: no bytes read


def _as_fp8(part: LinearWeight) -> LinearWeight:
    return part if part.scale is not None else LinearWeight(*quantize_rows(part.weight))


def _stored_with_row_scales(
    weights: Weights, prefix: str, fmt: WeightFormat, dim: int, start: int, stop: int
) -> LinearWeight:
    """The stored FP8 slice; its scales [N, 1], [N], [1] or [] as one float32 per row."""
    num_rows = weights.shape(f"{prefix}.weight")[0]
    scale = weights.get_stored(f"{prefix}.{fmt.scale_suffix}").float().flatten()
    if scale.numel() == 1:
        scale = scale.expand(num_rows)
    if scale.numel() != num_rows:
        raise ValueError(f"{prefix}: {scale.numel()} weight scales for {num_rows} output rows")
    if dim == 0:
        scale = scale[start:stop]
    quantized = weights.get_stored(f"{prefix}.weight", dim, start, stop)
    return LinearWeight(quantized, scale.contiguous())


def _dequantized_blocks(
    weights: Weights, prefix: str, fmt: WeightFormat, start: int, stop: int
) -> torch.Tensor:
    """Rows [start, stop) of a block-scaled weight in float32: each block times its scale."""
    assert fmt.block is not None
    block_rows, block_cols = fmt.block
    quantized = weights.get_stored(f"{prefix}.weight", 0, start, stop)
    first_block = start // block_rows
    scales = weights.get_stored(
        f"{prefix}.{fmt.scale_suffix}", 0, first_block, -(-stop // block_rows)
    ).float()
    per_row = scales.repeat_interleave(block_rows, dim=0)[start - first_block * block_rows :]
    per_element = per_row[: stop - start].repeat_interleave(block_cols, dim=1)
    return quantized.float() * per_element[:, : quantized.shape[1]]
