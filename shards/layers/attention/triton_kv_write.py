"""The rotary embedding and the paged KV-cache write in one launch.

One program per token rotates the token's q and k heads in place (rounding exactly as
triton_rotary does, whose jitted helpers it shares) and scatters the rotated keys and the values
into the cache at its slot, so k is read once. Heads of an FP8 qkv projection's unscaled product
(fp8.ScaledProduct) get their scales applied as they are read, and q, k and v written back
scaled. Negative slots (padded rows of a CUDA graph) are
rotated but not written. Models without rotary embeddings (learned positions, ALiBi) take the
same kernel with ROTATE off: k and v are only written. No host synchronization, and the token
count reaches the kernel only through the grid: it sits inside CUDA graphs and nothing compiles
after warmup.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.shards.kv_cache import is_keys_major
from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs
from shardline.shards.layers.triton_rotary import load_cos_sin, load_halves, rotate_heads


@triton.jit
def cache_slot(cache_ptr, slot, stride_cb, stride_ct, PAGE_SIZE: tl.constexpr):
    """The pointer to `slot`'s first element in a paged cache [pages, PAGE_SIZE, heads, dim]."""
    return cache_ptr + (slot // PAGE_SIZE) * stride_cb + (slot % PAGE_SIZE) * stride_ct


@triton.jit
def _cache_ptrs(
    cache_ptr, slot, stride_cb, stride_ct, stride_ch, stride_cd, offs_h, offs_d,
    PAGE_SIZE: tl.constexpr,
):  # fmt: skip
    """Pointers [heads, dims] to elements offs_d of KV heads offs_h at `slot` of a paged cache."""
    row = cache_slot(cache_ptr, slot, stride_cb, stride_ct, PAGE_SIZE)
    return row + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd


@triton.jit
def finite_values(v, V_KEYS_MAJOR: tl.constexpr):
    """Values to write into a V cache: NaN stored as 0 in a keys-major one, whose stale slots
    the decode kernels read unmasked at zero weight (triton_tiles.paged_kv_tiles); an inf
    saturates in the GPU's FP8 conversion already."""
    if V_KEYS_MAJOR:
        v = tl.where(v == v, v, 0.0)
    return v


@triton.jit
def _read_heads(
    src, row_scale, col_scale_ptr, offs_h, offs_d, mask, HALF: tl.constexpr, SCALED: tl.constexpr
):
    """The two halves of a token's KV heads at `src` ([heads, dims] pointers); with SCALED an
    FP8 product's unscaled heads, returned scaled and written back so (the attention reads them
    there too)."""
    x1, x2 = load_halves(src, row_scale, col_scale_ptr, offs_h, offs_d, mask, HALF, SCALED)
    if SCALED:
        tl.store(src, x1, mask=mask)
        tl.store(src + HALF, x2, mask=mask)
    return x1, x2


@triton.jit
def _rotate_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    row_scale_ptr,
    col_scale_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    stride_vcd,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KV_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    ROTATE: tl.constexpr,
    SCALED: tl.constexpr,
    V_KEYS_MAJOR: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_KV_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    heads_mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HALF)
    # the slot broadcast first: Triton's CPU interpreter refuses a scalar condition in a mask
    mask = heads_mask & ((tl.zeros([BLOCK_KV_H, BLOCK_HALF], dtype=tl.int64) + slot) >= 0)
    row_scale = 1.0
    if SCALED:  # the qkv columns: q heads, k heads, v heads of 2 * HALF each
        row_scale = tl.load(row_scale_ptr + token)
    k_scales = col_scale_ptr + NUM_HEADS * 2 * HALF
    v_scales = k_scales + NUM_KV_HEADS * 2 * HALF
    if ROTATE:
        position = tl.load(positions_ptr + token).to(tl.int64)
        cos, sin = load_cos_sin(
            cos_ptr, sin_ptr, position, stride_cos, stride_sin, HALF, BLOCK_HALF
        )
        rotate_heads(
            q_ptr, token, stride_qt, stride_qh, NUM_HEADS, cos, sin, HALF, BLOCK_H, BLOCK_HALF,
            row_scale, col_scale_ptr, SCALED,
        )  # fmt: skip
        k1, k2 = rotate_heads(
            k_ptr, token, stride_kt, stride_kh, NUM_KV_HEADS, cos, sin, HALF, BLOCK_KV_H,
            BLOCK_HALF, row_scale, k_scales, SCALED,
        )  # fmt: skip
    else:
        k_src = k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
        k1, k2 = _read_heads(k_src, row_scale, k_scales, offs_h, offs_d, heads_mask, HALF, SCALED)
    k_dst = _cache_ptrs(
        k_cache_ptr, slot, stride_kcb, stride_kct, stride_kch, 1, offs_h, offs_d, PAGE_SIZE
    )
    v_dst = _cache_ptrs(
        v_cache_ptr, slot, stride_vcb, stride_vct, stride_vch, stride_vcd, offs_h, offs_d,
        PAGE_SIZE,
    )  # fmt: skip
    v_src = v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    v1, v2 = _read_heads(v_src, row_scale, v_scales, offs_h, offs_d, heads_mask, HALF, SCALED)
    v1, v2 = finite_values(v1, V_KEYS_MAJOR), finite_values(v2, V_KEYS_MAJOR)
    k_dtype = k_cache_ptr.dtype.element_ty
    v_dtype = v_cache_ptr.dtype.element_ty
    tl.store(k_dst, k1.to(k_dtype), mask=mask)
    tl.store(k_dst + HALF, k2.to(k_dtype), mask=mask)
    tl.store(v_dst, v1.to(v_dtype), mask=mask)
    tl.store(v_dst + HALF * stride_vcd, v2.to(v_dtype), mask=mask)


def _check_contiguous_last_dim(**tensors: torch.Tensor) -> None:
    strided = [name for name, tensor in tensors.items() if tensor.stride(-1) != 1]
    if strided:
        raise ValueError(f"{', '.join(strided)} need a contiguous last (head_dim) dimension")


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes k and v [tokens, kv_heads, dim] into the caches at slot_mapping (negative slots
    skipped), unrotated; one launch."""
    rotate_and_write_kv_cache(k, k, v, None, None, None, k_cache, v_cache, slot_mapping)


def rotate_and_write_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qkv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Rotates q [tokens, heads, dim] and k [tokens, kv_heads, dim] in place by cos/sin
    [max_pos, dim / 2] at `positions` (as triton_rotary.rotate_in_place), then writes k and v
    into the caches at slot_mapping (negative slots skipped); one launch. Without cos/sin
    (write_kv_cache) nothing is rotated. `qkv_scales` (row [tokens], column [(heads + 2 *
    kv_heads) * dim]): q, k and v are an FP8 product's unscaled heads, written back scaled."""
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    rotate = cos is not None
    if not rotate:  # unread stand-ins
        if qkv_scales is not None:
            raise ValueError("qkv scales come with a rotation (q's columns lead the product)")
        positions, cos, sin = slot_mapping, k_cache[0, 0], k_cache[0, 0]
    row_scale, col_scale = qkv_scales or (slot_mapping, slot_mapping)  # unread stand-ins
    _check_contiguous_last_dim(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=k_cache)
    num_kv_heads, half = k.shape[1], head_dim // 2
    _rotate_write_kv_kernel[(num_tokens,)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        k_cache,
        v_cache,
        slot_mapping,
        row_scale,
        col_scale,
        *q.stride()[:2],
        *k.stride()[:2],
        *v.stride()[:2],
        cos.stride(0),
        sin.stride(0),
        *k_cache.stride()[:3],
        *v_cache.stride(),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_KV_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        PAGE_SIZE=k_cache.shape[1],
        ROTATE=rotate,
        SCALED=qkv_scales is not None,
        V_KEYS_MAJOR=is_keys_major(v_cache),
        num_warps=4,
        enable_fp_fusion=False,  # an FMA would skip the rounding of a product
        **pdl_launch(q.device, num_tokens),
    )
