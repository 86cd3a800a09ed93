"""SiLU(gate) * up, or tanh-GELU(gate) * up (GeGLU), in Triton: one read of the fused gate/up
rows, one write of the product; for an FP8 linear layer after it, the product quantized per
token (FP8Rows) in the same launch. The rows may be an FP8 GEMM's ScaledProduct: its scales are
applied as they are read."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.shards.layers.fp8 import FP8, FP8Rows, Product, kernel_operands
from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs
from shardline.shards.layers.triton_fp8_quant import store_row_scale, to_fp8

BLOCK = 1024
# The widest row the FP8 kernel keeps in registers (32 products a thread at 16 warps): one read
# of gate/up instead of two, and no loop (at decode batch sizes the 8B's 14,336-wide rows took
# ~16 µs a call looping over two passes, about 3x what their bytes take at full bandwidth).
ONE_PASS_WIDTH = 16384


@triton.jit
def _act_and_mul_kernel(
    gate_up_ptr,
    row_scale_ptr,
    col_scale_ptr,
    out_ptr,
    width,
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
    GELU_TANH: tl.constexpr,
    SCALED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    scales = (row_scale_ptr + row, col_scale_ptr, SCALED)
    out = _act_product(gate_up_ptr + row * stride_in, cols, width, GELU_TANH, *scales)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=cols < width)


@triton.jit
def _act_and_mul_fp8_kernel(
    gate_up_ptr,
    row_scale_ptr,
    col_scale_ptr,
    q_ptr,
    scale_ptr,
    width,
    stride_in,
    stride_q,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,
    GELU_TANH: tl.constexpr,
    SCALED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """A program per row, stored in FP8 (triton_fp8_quant's numbers): a row that fits one BLOCK
    computed once and kept in registers; a longer one's products once for their largest
    magnitude, then again (from cache) divided by the scale."""
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    in_row = gate_up_ptr + row * stride_in
    scales = (row_scale_ptr + row, col_scale_ptr, SCALED)
    if ONE_PASS:
        product = _act_product(in_row, offs, width, GELU_TANH, *scales)
        scale = store_row_scale(tl.abs(product), scale_ptr + row)
        tl.store(q_ptr + row * stride_q + offs, to_fp8(product, scale, q_ptr), mask=offs < width)
        return
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.range(0, width, BLOCK):
        amax = tl.maximum(
            amax, tl.abs(_act_product(in_row, start + offs, width, GELU_TANH, *scales))
        )
    scale = store_row_scale(amax, scale_ptr + row)
    for start in tl.range(0, width, BLOCK):
        cols = start + offs
        quantized = to_fp8(_act_product(in_row, cols, width, GELU_TANH, *scales), scale, q_ptr)
        tl.store(q_ptr + row * stride_q + cols, quantized, mask=cols < width)


@triton.jit
def _act_product(
    row_ptr,
    cols,
    width,
    GELU_TANH: tl.constexpr,
    row_scale_ptr,
    col_scale_ptr,
    SCALED: tl.constexpr,
):
    """act(gate) * up at `cols` of one [gate | up] row, rounded to the row's dtype, in float32
    (masked lanes 0); with SCALED the row is a ScaledProduct's, its value taken first."""
    mask = cols < width
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0)
    up = tl.load(row_ptr + width + cols, mask=mask, other=0.0)
    dtype = row_ptr.dtype.element_ty
    if SCALED:
        row_scale = tl.load(row_scale_ptr)
        gate_scale = tl.load(col_scale_ptr + cols, mask=mask, other=0.0)
        up_scale = tl.load(col_scale_ptr + width + cols, mask=mask, other=0.0)
        gate = (gate.to(tl.float32) * row_scale * gate_scale).to(dtype)
        up = (up.to(tl.float32) * row_scale * up_scale).to(dtype)
    gate = gate.to(tl.float32)
    if GELU_TANH:  # 0.5 x (1 + tanh(z)) = x * sigmoid(2 z), z = sqrt(2 / pi) (x + 0.044715 x^3)
        inner = 0.7978845608028654 * (gate + 0.044715 * (gate * gate * gate))
        act = (gate / (1.0 + tl.exp(-2.0 * inner))).to(dtype)
    else:
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(dtype).to(tl.float32)


def triton_silu_and_mul(gate_up: Product, fp8: bool = False) -> torch.Tensor | FP8Rows:
    """SiLU(gate) * up for gate_up [..., 2 * n] holding gate then up; returns [..., n] (FP8Rows
    with `fp8`, gate_up 2-D)."""
    return _act_and_mul(gate_up, gelu_tanh=False, fp8=fp8)


def triton_gelu_tanh_and_mul(gate_up: Product, fp8: bool = False) -> torch.Tensor | FP8Rows:
    """tanh-GELU(gate) * up for gate_up [..., 2 * n] holding gate then up; returns [..., n]
    (FP8Rows with `fp8`, gate_up 2-D)."""
    return _act_and_mul(gate_up, gelu_tanh=True, fp8=fp8)


def _act_and_mul(gate_up: Product, gelu_tanh: bool, fp8: bool) -> torch.Tensor | FP8Rows:
    gate_up, *scales, scaled = kernel_operands(gate_up)
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if fp8:
        return _act_and_mul_fp8(rows, scales, scaled, gelu_tanh)
    out = torch.empty((rows.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] > 0:
        grid = (rows.shape[0], triton.cdiv(width, BLOCK))
        _act_and_mul_kernel[grid](
            rows,
            *scales,
            out,
            width,
            rows.stride(0),
            out.stride(0),
            BLOCK=BLOCK,
            GELU_TANH=gelu_tanh,
            SCALED=scaled,
            num_warps=4,
            **pdl_launch(gate_up.device, rows.shape[0]),
        )
    return out.view(*gate_up.shape[:-1], width)


def _act_and_mul_fp8(
    rows: torch.Tensor, scales: list[torch.Tensor], scaled: bool, gelu_tanh: bool
) -> FP8Rows:
    count, width = rows.shape[0], rows.shape[1] // 2
    quantized = torch.empty((count, width), dtype=FP8, device=rows.device)
    scale = torch.empty(count, dtype=torch.float32, device=rows.device)
    if count:
        block = triton.next_power_of_2(width)
        one_pass = block <= ONE_PASS_WIDTH
        _act_and_mul_fp8_kernel[(count,)](
            rows,
            *scales,
            quantized,
            scale,
            width,
            rows.stride(0),
            quantized.stride(0),
            BLOCK=block if one_pass else BLOCK,
            ONE_PASS=one_pass,
            GELU_TANH=gelu_tanh,
            SCALED=scaled,
            num_warps=min(16, max(4, block // 1024)) if one_pass else 4,  # <= 32 products a thread
            **pdl_launch(rows.device, count),
        )
    return FP8Rows(quantized, scale, rows.dtype)
