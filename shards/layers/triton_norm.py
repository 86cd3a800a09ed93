"""RMSNorm fused with the residual add, in Triton: one read of x (and residual), one write of each.

Rounds where the torch RMSNorm in norm.py rounds (the sum to the input dtype, the normalized
value to the input dtype before the weight), so both give the same result up to the order of
the float32 mean-of-squares reduction. For an FP8 linear layer after it (fp8.takes_fp8_rows) it
writes the normed row quantized per token (FP8Rows) instead: the numbers RMSNorm then
fp8.quantize_rows give, in one launch. x may be an FP8 GEMM's ScaledProduct: its scales are
applied as the row is read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.shards.layers.fp8 import FP8, FP8Rows, Product, kernel_operands
from shardline.shards.layers.norm import NormOutput
from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs
from shardline.shards.layers.triton_fp8_quant import store_row_scale, to_fp8


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    x_row_scale_ptr,
    x_col_scale_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_ptr,
    scale_ptr,
    eps,
    hidden,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    SCALED_X: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FP8_OUT: tl.constexpr,
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
    if SCALED_X:  # ScaledProduct.value's numbers
        col_scale = tl.load(x_col_scale_ptr + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) * tl.load(x_row_scale_ptr + row) * col_scale).to(x.dtype)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    normed = (x32 * inv_rms).to(x_ptr.dtype.element_ty)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    if FP8_OUT:  # rounded to x's dtype, then quantized as triton_fp8_quant does
        out = out.to(x_ptr.dtype.element_ty).to(tl.float32)
        out = to_fp8(out, store_row_scale(tl.abs(out), scale_ptr + row), out_ptr)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: Product,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    fp8: bool = False,
) -> NormOutput:
    """RMSNorm(x) * weight, or with `residual` (normed(x + residual), x + residual); with `fp8`
    (x 2-D, of the weight's dtype) the normed rows come as FP8Rows."""
    x, row_scale, col_scale, scaled = kernel_operands(x)
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden).contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    fp8 = fp8 and out_dtype == x.dtype
    out = torch.empty(rows.shape, dtype=FP8 if fp8 else out_dtype, device=x.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device) if fp8 else out
    summed = torch.empty_like(rows) if residual is not None else out
    res_rows = residual.reshape(-1, hidden).contiguous() if residual is not None else rows
    if rows.shape[0] > 0:
        _rms_norm_kernel[(rows.shape[0],)](
            rows,
            row_scale,
            col_scale,
            res_rows,
            weight,
            out,
            summed,
            scale,
            eps,
            hidden,
            rows.stride(0),
            res_rows.stride(0),
            out.stride(0),
            summed.stride(0),
            SCALED_X=scaled,
            HAS_RESIDUAL=residual is not None,
            FP8_OUT=fp8,
            BLOCK=triton.next_power_of_2(hidden),
            num_warps=min(16, max(1, triton.next_power_of_2(hidden) // 256)),
            enable_fp_fusion=False,  # squares rounded before the sum, as torch's pow(2)
            **pdl_launch(x.device, rows.shape[0]),
        )
    normed = FP8Rows(out, scale, x.dtype) if fp8 else out.view(*x.shape[:-1], hidden)
    return normed if residual is None else (normed, summed.view(x.shape))
