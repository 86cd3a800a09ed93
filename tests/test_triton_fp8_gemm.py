"""The weight-only FP8 GEMM for a few rows (triton_fp8_gemm.py) against F.linear on the
dequantized weight in float32.

Under Triton's CPU interpreter (TRITON_INTERPRET=1; tests/test_triton_interpreted.py runs this
file so) the 8B model's weight widths and depths come one at a time against a small other side,
with the H100's tiling; on a GPU the whole 8B shapes, the dispatch through fp8_linear and a CUDA
graph capture as well.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.triton_device import DEVICE, INTERPRET  # isort: skip (skips first)

from shardline.shards.layers.fp8 import (
    SKINNY_GEMM_MAX_ROWS,
    dequantize_rows,
    fp8_linear,
    quantize_rows,
    skinny_gemm_applies,
)
from shardline.shards.layers.triton_fp8_gemm import SkinnyConfig, fp8_skinny_gemm

# The 8B shape's output widths (o/down 4096, qkv 6144, gate_up 28672, LM head 128256) and input
# depths (4096, down's 14336), each against a small other side; widths and depths that no tile
# divides. The widest take one row count each: the interpreter runs their 448 and 2004 programs
# one by one (25 s of the file's 40).
SMALL_SHAPES = [(4096, 48), (6144, 40), (24, 4096), (40, 14336), (300, 1000), (17, 130)]
INTERPRETED = [(shape, rows) for shape in SMALL_SHAPES for rows in (1, 16, 33)]
INTERPRETED += [((28672, 16), 5), ((128256, 16), 3)]
GPU_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (300, 1000)]
GPU = [(shape, rows) for shape in GPU_SHAPES for rows in (1, 5, 16, 33, 64)]
# The CPU interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest.
DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
needs_fp8_gpu = pytest.mark.skipif(
    INTERPRET or torch.cuda.get_device_capability() < (8, 9),
    reason="Triton converts FP8 on a GPU of compute capability 8.9",
)


def _fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of magnitudes 1e-2 to 1e2: a scale applied to the wrong row shows."""
    magnitudes = torch.logspace(-2, 2, n, device=DEVICE)[torch.randperm(n, device=DEVICE)]
    return quantize_rows(torch.randn(n, k, device=DEVICE) * magnitudes[:, None])


def _reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    return F.linear(
        x.float(), dequantize_rows(weight, scale), None if bias is None else bias.float()
    )


def _assert_matches(out: torch.Tensor, x: torch.Tensor, weight, scale, bias) -> None:
    expected = _reference(x, weight, scale, bias)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert torch.isfinite(out).all()
    error = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error < TOLERANCE[x.dtype]


@pytest.mark.parametrize(("shape", "rows"), INTERPRETED if INTERPRET else GPU)
@pytest.mark.parametrize("dtype", DTYPES)
def test_skinny_gemm_matches_the_dequantized_product(
    dtype: torch.dtype, shape: tuple[int, int], rows: int
) -> None:
    n, k = shape
    weight, scale = _fp8_weight(n, k)
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if rows % 2 else None
    _assert_matches(fp8_skinny_gemm(x, weight, scale, bias), x, weight, scale, bias)


@pytest.mark.parametrize(
    "config",
    [
        SkinnyConfig(block_m=16, block_n=64, block_k=32, num_warps=4, num_stages=3),
        SkinnyConfig(block_m=64, block_n=16, block_k=128, num_warps=8, num_stages=2),
        SkinnyConfig(block_m=32, block_n=32, block_k=64, num_warps=2, num_stages=4),
    ],
)
def test_every_tiling_covers_strided_rows_past_one_row_tile(config: SkinnyConfig) -> None:
    """x a slice of wider rows (stride > K), 70 rows (more than one BLOCK_M), in [2, 35, K]."""
    weight, scale = _fp8_weight(200, 330)
    wide = torch.randn(2, 35, 400, device=DEVICE).to(torch.float16)
    x = wide[..., :330]
    bias = torch.randn(200, device=DEVICE).to(torch.float16)
    out = fp8_skinny_gemm(x, weight, scale, bias, config)
    assert out.shape == (2, 35, 200)
    _assert_matches(out.reshape(70, 200), x.reshape(70, 330), weight, scale, bias)


@needs_fp8_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_linear_takes_it_up_to_the_threshold(dtype: torch.dtype) -> None:
    weight, scale = _fp8_weight(1024, 2048)
    bias = torch.randn(1024, device=DEVICE).to(dtype)
    for rows in (2, SKINNY_GEMM_MAX_ROWS):
        x = torch.randn(rows, 2048, device=DEVICE).to(dtype)
        assert skinny_gemm_applies(x, weight)
        torch.testing.assert_close(
            fp8_linear(x, weight, scale, bias),
            fp8_skinny_gemm(x, weight, scale, bias),
            rtol=0,
            atol=0,
        )
        _assert_matches(fp8_linear(x, weight, scale, bias), x, weight, scale, bias)
    past = torch.randn(SKINNY_GEMM_MAX_ROWS + 1, 2048, device=DEVICE).to(dtype)
    assert not skinny_gemm_applies(past, weight)


@needs_fp8_gpu
def test_fp8_linear_runs_it_in_a_cuda_graph() -> None:
    """Captured once, replayed on new inputs: the same numbers as eager calls on them."""
    weight, scale = _fp8_weight(4096, 4096)
    x = torch.randn(2, max(1, SKINNY_GEMM_MAX_ROWS // 2), 4096, device=DEVICE).to(torch.bfloat16)
    assert skinny_gemm_applies(x, weight)
    fp8_linear(x, weight, scale)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fp8_linear(x, weight, scale)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(captured, fp8_linear(x, weight, scale), rtol=0, atol=0)
    _assert_matches(captured.reshape(-1, 4096), x.reshape(-1, 4096), weight, scale, None)
