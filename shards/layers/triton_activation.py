"""SiLU(gate) * up, or tanh-GELU(gate) * up (GeGLU), in Triton: one read of the fused gate/up
rows, one write of the product."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs

BLOCK = 1024


@triton.jit
def _act_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    width,
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
    GELU_TANH: tl.constexpr,
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
    if GELU_TANH:  # 0.5 x (1 + tanh(z)) = x * sigmoid(2 z), z = sqrt(2 / pi) (x + 0.044715 x^3)
        inner = 0.7978845608028654 * (gate + 0.044715 * (gate * gate * gate))
        act = (gate / (1.0 + tl.exp(-2.0 * inner))).to(out_dtype)
    else:
        act = (gate / (1.0 + tl.exp(-gate))).to(out_dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_dtype), mask=mask)


def triton_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [..., 2 * n] holding gate then up; returns [..., n]."""
    return _act_and_mul(gate_up, gelu_tanh=False)


def triton_gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """tanh-GELU(gate) * up for gate_up [..., 2 * n] holding gate then up; returns [..., n]."""
    return _act_and_mul(gate_up, gelu_tanh=True)


def _act_and_mul(gate_up: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] > 0:
        grid = (rows.shape[0], triton.cdiv(width, BLOCK))
        _act_and_mul_kernel[grid](
            rows,
            out,
            width,
            rows.stride(0),
            out.stride(0),
            BLOCK=BLOCK,
            GELU_TANH=gelu_tanh,
            num_warps=4,
            **pdl_launch(gate_up.device, rows.shape[0]),
        )
    return out.view(*gate_up.shape[:-1], width)
