"""One-row linear layers (batch-1 decode) in Triton: y = x @ W.T (+ bias), W [N, K] row-major.

At one row a linear layer only streams its weight; cuBLAS reaches 1.3-2.7 TB/s on the 8-67 MB
weights of a 2B model where the copy ceiling is 3 TB/s. Each program here computes BLOCK_N
outputs over the whole of K, its weight tiles loaded one ahead, and with PDL (pdl.py) issues
its first tile before waiting for the kernel before it. Measured on an H100 in one batch-1
graph of the SmolLM2-1.7B shape (benchmarks/RESULTS.md): 2.4-3.1 TB/s on every projection.

The batch-1 decode forward of a single-GPU model also folds the RMSNorms and SiLU * up into
these kernels (`gemv_normed`, `gemv_residual`): a kernel ending a residual branch adds the
residual and accumulates the new residual's sum of squares into a float32 slot; the next one
multiplies its input by the norm weight and scales its outputs by 1 / rms from that slot. The
qkv projection also rotates its q and k heads and writes k and v into the paged cache
(`rope_kv`), so no kernel sits between it and the decode attention (8B FP8 on an H100: 3.34 ->
3.30 ms a step).

An FP8 weight (fp8.py: float8_e4m3fn with one float32 scale per row) streams half the bytes:
each output is its row's dot product times the row's scale, before the bias and the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.shards.kv_cache import is_keys_major
from shardline.shards.layers.attention.triton_kv_write import cache_slot, finite_values
from shardline.shards.layers.fp8 import FP8, has_fp8_tensor_cores
from shardline.shards.layers.gemv_plan import Epilogue, GemvConfig, RopeKV, weight_tiling
from shardline.shards.layers.pdl import allow_dependents, pdl_launch, wait_for_inputs
from shardline.shards.layers.triton_rotary import rotate_halves


@triton.jit
def _epilogue(
    out,
    offs_n,
    n_mask,
    n,
    y_ptr,
    residual_ptr,
    ss_out_ptr,
    BLOCK_N: tl.constexpr,
    EPILOGUE: tl.constexpr,
):
    dtype = y_ptr.dtype.element_ty
    if EPILOGUE == 0:
        tl.store(y_ptr + offs_n, out.to(dtype), mask=n_mask)
    elif EPILOGUE == 1:
        residual = tl.load(residual_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        summed = (residual + out).to(dtype)
        tl.store(y_ptr + offs_n, summed, mask=n_mask)
        squares = summed.to(tl.float32) * summed.to(tl.float32)
        tl.atomic_add(ss_out_ptr, tl.sum(squares, axis=0), sem="relaxed")
    else:
        gate, up = tl.split(tl.reshape(out, [BLOCK_N // 2, 2]))
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up
        offs = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + offs, act.to(dtype), mask=offs < n // 2)


@triton.jit
def _rope_kv_epilogue(
    out,
    n,
    y_ptr,
    position_ptr,
    cos_ptr,
    sin_ptr,
    stride_cos,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    BLOCK_N: tl.constexpr,
    HALF: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    V_KEYS_MAJOR: tl.constexpr,
):
    """Output slots 2j, 2j + 1 hold rotary pair j: element d and d + HALF of one head."""
    dtype = y_ptr.dtype.element_ty
    first, second = tl.split(tl.reshape(out, [BLOCK_N // 2, 2]))
    pair = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    mask = pair < n // 2
    head, dim = pair // HALF, pair % HALF
    position = tl.load(position_ptr).to(tl.int64)
    cos = tl.load(cos_ptr + position * stride_cos + dim, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + position * stride_cos + dim, mask=mask, other=0.0).to(tl.float32)
    turned_first, turned_second = rotate_halves(first, second, cos, sin, dtype)
    turns = head < NUM_HEADS + NUM_KV_HEADS  # q and k heads; v heads stay
    first = tl.where(turns, turned_first, first.to(dtype))
    second = tl.where(turns, turned_second, second.to(dtype))
    row = y_ptr + head * (2 * HALF) + dim
    tl.store(row, first, mask=mask)
    tl.store(row + HALF, second, mask=mask)
    slot = tl.load(slot_ptr + tl.zeros_like(pair)).to(tl.int64)  # one per pair: a mask
    kv = head - NUM_HEADS  # k heads, then v heads
    writes = mask & (kv >= 0) & (slot >= 0)
    is_v = kv >= NUM_KV_HEADS
    writes_k, writes_v = writes & (kv < NUM_KV_HEADS), writes & is_v
    cache_head = tl.where(is_v, kv - NUM_KV_HEADS, kv)
    k_row = cache_slot(k_cache_ptr, slot, stride_kb, stride_kt, PAGE_SIZE)
    v_row = cache_slot(v_cache_ptr, slot, stride_vb, stride_vt, PAGE_SIZE)
    k_dst = k_row + cache_head * stride_kh + dim
    v_dst = v_row + cache_head * stride_vh + dim * stride_vd
    cache_dtype = k_cache_ptr.dtype.element_ty
    tl.store(k_dst, first.to(cache_dtype), mask=writes_k)
    tl.store(k_dst + HALF, second.to(cache_dtype), mask=writes_k)
    v_first, v_second = finite_values(first, V_KEYS_MAJOR), finite_values(second, V_KEYS_MAJOR)
    tl.store(v_dst, v_first.to(cache_dtype), mask=writes_v)
    tl.store(v_dst + HALF * stride_vd, v_second.to(cache_dtype), mask=writes_v)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    scale_ptr,  # HAS_SCALE: float32 [N], an FP8 weight's row scales
    y_ptr,
    norm_ptr,  # NORM: the RMSNorm weight [K] applied to x
    ss_in_ptr,  # NORM: float32 sum of squares of x
    residual_ptr,  # RESIDUAL epilogue: residual [N]
    ss_out_ptr,  # RESIDUAL epilogue: float32 slot the sum of squares of y is added to
    zero_ptr,  # ZERO: a float32 slot program 0 zeroes (for a later kernel's ss_out)
    position_ptr,  # ROPE_KV epilogue (RopeKV) from here
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    n,
    stride_w,
    eps,
    stride_cos,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    HALF: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    V_KEYS_MAJOR: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    NORM: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ZERO: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n
    rows = offs_n  # of the weight
    if EPILOGUE == 2:  # output slot 2j reads gate row j, slot 2j + 1 up row j
        rows = offs_n // 2 + (offs_n % 2) * (n // 2)
    elif EPILOGUE == 3:  # slot 2j reads its head's row d, slot 2j + 1 row d + HALF
        pair = offs_n // 2
        rows = (pair // HALF) * (2 * HALF) + pair % HALF + (offs_n % 2) * HALF
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    w_tile = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)  # depends on no kernel before
    wait_for_inputs(USE_PDL)
    if ZERO:
        tl.store(zero_ptr, 0.0, mask=tl.program_id(0) == 0)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for tile in tl.static_range(K // BLOCK_K):
        if tile + 1 < K // BLOCK_K:
            next_tile = tl.load(w_ptrs + (tile + 1) * BLOCK_K, mask=n_mask[:, None], other=0.0)
        x = tl.load(x_ptr + tile * BLOCK_K + offs_k).to(tl.float32)
        if NORM:
            x *= tl.load(norm_ptr + tile * BLOCK_K + offs_k).to(tl.float32)
        acc += w_tile.to(tl.float32) * x[None, :]
        if tile + 1 < K // BLOCK_K:
            w_tile = next_tile
    out = tl.sum(acc, axis=1)
    if HAS_SCALE:
        out *= tl.load(scale_ptr + rows, mask=n_mask, other=0.0)
    if NORM:
        out *= tl.rsqrt(tl.load(ss_in_ptr) / K + eps)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
    out = out.to(y_ptr.dtype.element_ty).to(tl.float32)  # rounded as the linear layer's output
    if EPILOGUE == 3:
        _rope_kv_epilogue(
            out, n, y_ptr, position_ptr, cos_ptr, sin_ptr, stride_cos, k_cache_ptr, v_cache_ptr,
            slot_ptr, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            stride_vd, BLOCK_N, HALF, NUM_HEADS, NUM_KV_HEADS, PAGE_SIZE, V_KEYS_MAJOR,
        )  # fmt: skip
    else:
        _epilogue(out, offs_n, n_mask, n, y_ptr, residual_ptr, ss_out_ptr, BLOCK_N, EPILOGUE)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One contiguous half-precision CUDA row against a weight the kernel tiles: of x's dtype,
    or FP8 (with its scales) on a GPU that converts FP8."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype in (torch.bfloat16, torch.float16)
        and (weight.dtype == x.dtype or (weight.dtype == FP8 and has_fp8_tensor_cores(x.device)))
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
        and weight_tiling(weight) is not None
    )


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    epilogue: Epilogue,
    zero: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    residual: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    rope_kv: RopeKV | None = None,
) -> torch.Tensor:
    if rope_kv is not None:
        epilogue = Epilogue.ROPE_KV
    config = config or weight_tiling(weight, epilogue)
    assert config is not None
    n, k = weight.shape
    norm_weight, ss_in, eps = norm if norm is not None else (weight, out, 0.0)
    residual_row, ss_out = residual if residual is not None else (out, out)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        scale if scale is not None else weight,
        out,
        norm_weight,
        ss_in,
        residual_row,
        ss_out,
        zero if zero is not None else out,
        *_rope_kv_args(rope_kv, out),
        n,
        weight.stride(0),
        eps,
        **_rope_kv_strides(rope_kv, n),
        K=k,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        NORM=norm is not None,
        EPILOGUE=int(epilogue),
        ZERO=zero is not None,
        num_warps=config.num_warps,
        **pdl_launch(x.device, 1),
    )
    return out


def _rope_kv_args(rope_kv: RopeKV | None, stand_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The ROPE_KV epilogue's tensors (`stand_in`s, unread, without it)."""
    if rope_kv is None:
        return (stand_in,) * 6
    r = rope_kv
    return r.position, r.cos, r.sin, r.k_cache, r.v_cache, r.slot


def _rope_kv_strides(rope_kv: RopeKV | None, n: int) -> dict[str, int]:
    """Its strides and shapes as the kernel's arguments (zeros, unread, without it)."""
    k_names = ("stride_kb", "stride_kt", "stride_kh")
    v_names = ("stride_vb", "stride_vt", "stride_vh", "stride_vd")
    if rope_kv is None:
        shapes = dict(HALF=1, NUM_HEADS=0, NUM_KV_HEADS=0, PAGE_SIZE=1, V_KEYS_MAJOR=False)
        return dict.fromkeys(("stride_cos", *k_names, *v_names), 0) | shapes
    _, page_size, kv_heads, head_dim = rope_kv.k_cache.shape
    if n != (rope_kv.num_heads + 2 * kv_heads) * head_dim or not rope_kv.layouts_agree():
        raise ValueError("ROPE_KV takes qkv rows (q, k, v heads) and k/v caches it can write")
    return dict(
        stride_cos=rope_kv.cos.stride(0),
        **dict(zip(k_names, rope_kv.k_cache.stride()[:3], strict=True)),
        **dict(zip(v_names, rope_kv.v_cache.stride(), strict=True)),
        HALF=head_dim // 2,
        NUM_HEADS=rope_kv.num_heads,
        NUM_KV_HEADS=kv_heads,
        PAGE_SIZE=page_size,
        V_KEYS_MAJOR=is_keys_major(rope_kv.v_cache),
    )


def _empty_row(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty((1, n), dtype=x.dtype, device=x.device)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    rope_kv: RopeKV | None = None,
) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T (+ bias) -> [1, N], as F.linear (check `gemv_applies` first);
    zeroes the one-element float32 `zero` on the way (see `gemv_normed`). An FP8 weight comes
    with its row `scale`s, here and in the fused variants below; `config` overrides the tiling
    (`gemv_config`'s, which it must divide as that one does). With `rope_kv` the weight is a
    qkv projection's: the output's q and k heads come rotated, and k and v are also written
    into the cache (as the attention backend's `rotate_and_write_kv`)."""
    out = _empty_row(x, weight.shape[0])
    return _launch(
        x, weight, bias, out, Epilogue.PLAIN, zero, scale=scale, config=config, rope_kv=rope_kv
    )


def gemv_normed(
    x: torch.Tensor,
    ss: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_pairs: bool = False,
    zero: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    rope_kv: RopeKV | None = None,
) -> torch.Tensor:
    """RMSNorm(x) * norm_weight @ weight.T (+ bias), with `ss` the float32 sum of squares of x
    (from `gemv_residual`). With `silu_pairs` the weight is gate_up_proj's (gate rows, then up
    rows; each program takes matching ones) and the result is SiLU(gate) * up [1, N / 2]; with
    `rope_kv` a qkv projection's (see `gemv`). Program 0 zeroes `zero` (the slot a later
    `gemv_residual` accumulates into: its ordering within one forward keeps CUDA graphs valid)."""
    epilogue = Epilogue.SILU_PAIRS if silu_pairs else Epilogue.PLAIN
    width = weight.shape[0] // 2 if silu_pairs else weight.shape[0]
    out = _empty_row(x, width)
    norm = (norm_weight, ss, eps)
    return _launch(
        x, weight, bias, out, epilogue, zero, norm=norm, scale=scale, config=config,
        rope_kv=rope_kv,
    )  # fmt: skip


def gemv_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    ss: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """residual + x @ weight.T (+ bias), its sum of squares added to the float32 `ss` (zero at
    launch)."""
    out = _empty_row(x, weight.shape[0])
    return _launch(
        x, weight, bias, out, Epilogue.RESIDUAL, residual=(residual, ss), scale=scale, config=config
    )
