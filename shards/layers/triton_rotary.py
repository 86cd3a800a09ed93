"""Rotary embedding in Triton: rotates every head of the packed tokens in place, one launch.

Each program takes one token, reads its position and that row of the cos/sin cache itself (no
gather kernel), and rotates all of the token's heads; q and k heads that sit side by side in the
fused qkv output are rotated by a single call. Rounds where torch's rotate-half rounds (each
product, then the sum, to the model dtype), so half-precision results equal apply_rotary's and
transformers' bit for bit; greedy tokens of bf16 models then track transformers' own.
`load_cos_sin` and `rotate_heads` also serve the fused rotary + KV-cache write of the Triton
attention backend (attention/triton_kv_write.py), and `rotate_halves` the batch-1 qkv GEMV's
rotary epilogue (triton_gemv.py): both rotate exactly as this kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x rounded to the model dtype and back, as torch rounds each product."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def load_cos_sin(
    cos_ptr,
    sin_ptr,
    position,
    stride_cos,
    stride_sin,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """The cos/sin cache rows of `position` as float32 [1, BLOCK_HALF] (zero past HALF)."""
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(cos_ptr + position * stride_cos + offs_d, mask=d_mask, other=0.0)
    sin = tl.load(sin_ptr + position * stride_sin + offs_d, mask=d_mask, other=0.0)
    return cos.to(tl.float32)[None, :], sin.to(tl.float32)[None, :]


@triton.jit
def rotate_halves(x1, x2, cos, sin, dtype: tl.constexpr):
    """The float32 halves (x1, x2) of a head rotated by cos/sin, rounding as torch does (each
    product, then the sum, to `dtype`); in `dtype`."""
    out1 = (_rounded(x1 * cos, dtype) - _rounded(x2 * sin, dtype)).to(dtype)
    out2 = (_rounded(x2 * cos, dtype) + _rounded(x1 * sin, dtype)).to(dtype)
    return out1, out2


@triton.jit
def scaled_value(raw, row_scale, col_scale_ptrs, mask):
    """fp8.ScaledProduct.value's numbers for the elements `raw` of one row."""
    col_scale = tl.load(col_scale_ptrs, mask=mask, other=0.0)
    return (raw.to(tl.float32) * row_scale * col_scale).to(raw.dtype)


@triton.jit
def load_halves(
    first, row_scale, col_scale_ptr, offs_h, offs_d, mask, HALF: tl.constexpr, SCALED: tl.constexpr
):
    """Heads' two halves at `first` ([heads, dims] pointers to the first); with SCALED an FP8
    product's unscaled heads, returned scaled (see rotate_heads)."""
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    if SCALED:
        cols = offs_h[:, None] * (2 * HALF) + offs_d[None, :]
        x1 = scaled_value(x1, row_scale, col_scale_ptr + cols, mask)
        x2 = scaled_value(x2, row_scale, col_scale_ptr + HALF + cols, mask)
    return x1, x2


@triton.jit
def rotate_heads(
    x_ptr,
    token,
    stride_xt,
    stride_xh,
    num_heads,
    cos,
    sin,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    row_scale,
    col_scale_ptr,
    SCALED: tl.constexpr,
):
    """Rotates the token's num_heads heads of x in place by cos/sin (from load_cos_sin), rounding
    as torch does; returns the rotated halves [BLOCK_H, BLOCK_HALF] in x's dtype. With SCALED, x
    holds an FP8 product's unscaled heads: each value times `row_scale` and its column's scale
    (col_scale_ptr: the heads' first), rounded to x's dtype, is what rotates (without SCALED
    neither is read)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    first = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1, x2 = load_halves(first, row_scale, col_scale_ptr, offs_h, offs_d, mask, HALF, SCALED)
    dtype = x_ptr.dtype.element_ty
    out1, out2 = rotate_halves(x1.to(tl.float32), x2.to(tl.float32), cos, sin, dtype)
    tl.store(first, out1, mask=mask)
    tl.store(first + HALF, out2, mask=mask)
    return out1, out2


@triton.jit
def _rotary_kernel(
    x_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    num_heads,
    stride_xt,
    stride_xh,
    stride_cos,
    stride_sin,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos, sin = load_cos_sin(cos_ptr, sin_ptr, position, stride_cos, stride_sin, HALF, BLOCK_HALF)
    rotate_heads(
        x_ptr, token, stride_xt, stride_xh, num_heads, cos, sin, HALF, BLOCK_H, BLOCK_HALF,
        1.0, x_ptr, False,
    )  # fmt: skip


def rotate_in_place(
    heads: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotates heads [T, H, head_dim] (any token/head strides) by cos/sin [max_pos, head_dim / 2]
    at `positions` [T]; every position must lie inside the cache."""
    num_tokens, num_heads, head_dim = heads.shape
    if heads.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("heads, cos and sin need a contiguous last dimension")
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        heads,
        positions,
        cos,
        sin,
        num_heads,
        heads.stride(0),
        heads.stride(1),
        cos.stride(0),
        sin.stride(0),
        HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
        enable_fp_fusion=False,  # an FMA would skip the rounding of a product
    )
