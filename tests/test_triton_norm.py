"""The fused Triton RMSNorm (+ residual add) against the torch RMSNorm it stands in for."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from shardline.shards.layers.norm import RMSNorm  # noqa: E402
from shardline.shards.layers.triton_norm import rms_norm  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float32: 1e-6}
# The CPU interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest.
DTYPES = [torch.float16, torch.float32] if INTERPRET else [*TOLERANCE]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 1000, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    x = (torch.randn((3, 5, hidden), device=DEVICE) * 3).to(dtype)
    residual = torch.randn_like(x) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    torch_norm = RMSNorm(weight, 1e-6)
    if residual is None:
        ref, out = torch_norm(x), rms_norm(x, weight, 1e-6)
    else:
        (ref, ref_sum), (out, out_sum) = (
            torch_norm(x, residual),
            rms_norm(x, weight, 1e-6, residual),
        )
        assert torch.equal(out_sum, ref_sum)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    assert _relative_error(out, ref) < TOLERANCE[dtype]
