"""The Triton row-scaled FP8 GEMM (triton_fp8_gemm.py) against the product of the dequantized
operands in float32, for each tiling the benchmark sweeps, row counts that do and do not fill a
row block, with and without a bias.

Runs on a GPU with FP8 tensor cores; elsewhere skipped unless TRITON_INTERPRET=1 is set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.triton_device import DEVICE, INTERPRET  # isort: skip (skips first)

from shardline.shards.layers.fp8 import FP8Rows, dequantize_rows, quantize_rows
from shardline.shards.layers.triton_fp8_gemm import (
    MAX_ROWS,
    MIN_ROWS,
    NARROW,
    WIDE,
    WIDE_MAX_ROWS,
    GemmTiling,
    fp8_gemm,
    tiling_for,
    triton_gemm_applies,
)
from tests.test_fp8 import relative_error

if not INTERPRET and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 tensor cores need compute capability 8.9", allow_module_level=True)

TILINGS = [NARROW.name, WIDE.name, "m64n64k128w4s4", "m128n128k128w8s3"]


def _rows(rows: int, k: int, dtype: torch.dtype) -> FP8Rows:
    x = torch.randn(rows, k, device=DEVICE) * torch.logspace(-2, 2, rows, device=DEVICE)[:, None]
    x[rows // 2] = 0.0  # a row of zeros: the smallest scale
    return FP8Rows(*quantize_rows(x.to(dtype)), dtype)


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("rows", [3, 64, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_gemm_matches_the_dequantized_product(tiling: str, rows: int, with_bias: bool):
    dtype = torch.bfloat16
    weight, weight_scale = quantize_rows(torch.randn(256, 512, device=DEVICE) * 0.05)
    bias = torch.randn(256, device=DEVICE).to(dtype) if with_bias else None
    x = _rows(rows, 512, dtype)
    out = fp8_gemm(x, weight, weight_scale, bias, GemmTiling.parse(tiling))
    expected = F.linear(
        dequantize_rows(x.quantized, x.scale),
        dequantize_rows(weight, weight_scale),
        None if bias is None else bias.float(),
    )
    assert out.dtype == dtype and out.shape == (rows, 256)
    assert relative_error(out.float(), expected) < 1e-2
    assert not out[rows // 2].any() or with_bias


def test_the_product_comes_back_in_float16_too() -> None:
    weight, weight_scale = quantize_rows(torch.randn(128, 256, device=DEVICE))
    x = _rows(5, 256, torch.float16)
    out = fp8_gemm(x, weight, weight_scale, None, tiling_for(MIN_ROWS, 128))
    expected = F.linear(
        dequantize_rows(x.quantized, x.scale), dequantize_rows(weight, weight_scale)
    )
    assert out.dtype == torch.float16
    assert relative_error(out.float(), expected) < 1e-2


def test_the_tiling_follows_the_rows_and_the_width() -> None:
    """Narrow tiles up to MAX_ROWS, wide ones for a wide weight up to WIDE_MAX_ROWS, cuBLASLt
    (None) for a few rows (PDL's) and past those."""
    assert tiling_for(MIN_ROWS - 1, 4096) is None
    assert tiling_for(MIN_ROWS, 4096) == tiling_for(MAX_ROWS, 4096) == NARROW
    assert tiling_for(MAX_ROWS + 1, 4096) is None
    assert tiling_for(WIDE_MAX_ROWS, 28672) == WIDE
    assert tiling_for(WIDE_MAX_ROWS + 1, 28672) is None


@pytest.mark.skipif(INTERPRET, reason="the dispatch takes CUDA tensors")
def test_a_weight_the_tiles_do_not_divide_goes_to_cublas() -> None:
    weight, _ = quantize_rows(torch.randn(256, 512, device=DEVICE))
    assert triton_gemm_applies(_rows(MIN_ROWS, 512, torch.bfloat16), weight, NARROW)
    odd_k, _ = quantize_rows(torch.randn(256, 528, device=DEVICE))
    assert not triton_gemm_applies(_rows(MIN_ROWS, 528, torch.bfloat16), odd_k, NARROW)


def test_a_tiling_is_parsed_from_its_name() -> None:
    assert GemmTiling.parse("m64n128k128w4s3") == GemmTiling(64, 128, 128, 4, 3)
    assert GemmTiling.parse(NARROW.name) == NARROW
    with pytest.raises(ValueError, match="not a GemmTiling"):
        GemmTiling.parse("n64w4s5")
