"""SiLU(gate) * up in Triton: one read of the fused gate/up rows, one write of the product."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    width,
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + width + cols, mask=mask, other=0.0)
    out_dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_dtype), mask=mask)


def triton_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [..., 2 * n] holding gate then up; returns [..., n]."""
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] > 0:
        grid = (rows.shape[0], triton.cdiv(width, BLOCK))
        _silu_and_mul_kernel[grid](
            rows,
            out,
            width,
            rows.stride(0),
            out.stride(0),
            BLOCK=BLOCK,
            num_warps=4,
            **pdl_launch(gate_up.device, rows.shape[0]),
        )
    return out.view(*gate_up.shape[:-1], width)
