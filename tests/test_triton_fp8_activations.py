"""The kernels that hand an FP8 linear layer its input already quantized per token (FP8Rows):
the fused RMSNorm and SiLU/GELU * up give exactly the numbers of the plain kernel followed by
triton_fp8_quant's quantization, which the FP8 GEMM tests check against torch.

Runs on CUDA; skipped elsewhere unless TRITON_INTERPRET=1 is set."""

from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE  # isort: skip (skips first)

from shardline.shards.layers.fp8 import FP8, FP8Rows
from shardline.shards.layers.triton_activation import (
    triton_gelu_tanh_and_mul,
    triton_silu_and_mul,
)
from shardline.shards.layers.triton_fp8_quant import quantize_rows_triton
from shardline.shards.layers.triton_norm import rms_norm

HALF = [torch.bfloat16, torch.float16]


def _random(shape: tuple[int, ...], dtype: torch.dtype, std: float) -> torch.Tensor:
    return (torch.randn(shape, device=DEVICE) * std).to(dtype)


def _assert_same_rows(fused: FP8Rows, plain: torch.Tensor) -> None:
    quantized, scale = quantize_rows_triton(plain)
    assert isinstance(fused, FP8Rows) and fused.dtype == plain.dtype
    assert fused.quantized.dtype == FP8 and fused.quantized.shape == plain.shape
    assert torch.equal(fused.scale, scale)
    assert torch.equal(fused.quantized.float(), quantized.float())


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 1000, 4096])
@pytest.mark.parametrize("dtype", HALF)
def test_rms_norm_quantizes_what_it_normed(dtype: torch.dtype, hidden: int, with_residual: bool):
    x = _random((37, hidden), dtype, std=3.0)
    x[5] = 0.0  # a row of zeros: the smallest scale, zeros
    residual = _random(x.shape, dtype, std=1.0) if with_residual else None
    if residual is not None:
        residual[5] = 0.0
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    plain = rms_norm(x, weight, 1e-6, residual)
    fused = rms_norm(x, weight, 1e-6, residual, fp8=True)
    if residual is None:
        _assert_same_rows(fused, plain)
    else:
        _assert_same_rows(fused[0], plain[0])
        assert torch.equal(fused[1], plain[1])


def test_rms_norm_keeps_half_precision_for_a_wider_weight() -> None:
    """A float32 weight promotes the normed rows past x's dtype: no FP8 rows then."""
    x = _random((4, 64), torch.bfloat16, std=1.0)
    out = rms_norm(x, torch.ones(64, device=DEVICE), 1e-6, fp8=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


@pytest.mark.parametrize("kernel", [triton_silu_and_mul, triton_gelu_tanh_and_mul])
# rows up to ONE_PASS_WIDTH products are computed once in registers, wider ones in two passes
@pytest.mark.parametrize("shape", [(2, 64), (7, 2 * 2000), (40, 2 * 14336), (3, 2 * 20000)])
@pytest.mark.parametrize("dtype", HALF)
def test_act_and_mul_quantizes_its_products(dtype: torch.dtype, shape: tuple[int, int], kernel):
    gate_up = _random(shape, dtype, std=3.0)
    gate_up[1] = 0.0
    _assert_same_rows(kernel(gate_up, fp8=True), kernel(gate_up))
