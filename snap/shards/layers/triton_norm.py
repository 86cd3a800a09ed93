"""RMSNorm fused with the residual add, in Triton: one read of x (and residual), one write of each.

Rounds where the torch RMSNorm in norm.py rounds (the sum to the input dtype, the normalized
value to the input dtype before the weight), so both give the same result up to the order of
the float32 mean-of-squares reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_ptr,
    eps,
    hidden,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    wait_for_inputs(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    normed = (x32 * inv_rms).to(x_ptr.dtype.element_ty)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x) * weight, or with `residual` (normed(x + residual), x + residual)."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden).contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty_like(rows) if residual is not None else out
    res_rows = residual.reshape(-1, hidden).contiguous() if residual is not None else rows
    if rows.shape[0] > 0:
        _rms_norm_kernel[(rows.shape[0],)](
            rows,
            res_rows,
            weight,
            out,
            summed,
            eps,
            hidden,
            rows.stride(0),
            res_rows.stride(0),
            out.stride(0),
            summed.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(hidden),
            num_warps=min(16, max(1, triton.next_power_of_2(hidden) // 256)),
            enable_fp_fusion=False,  # squares rounded before the sum, as torch's pow(2)
            **pdl_launch(x.device, rows.shape[0]),
        )
    out = out.view(*x.shape[:-1], hidden)
    return out if residual is None else (out, summed.view(x.shape))
