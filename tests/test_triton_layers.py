"""The Triton layer kernels (RMSNorm, rotary, SiLU * up, one-row GEMV) against the torch paths
they replace.

Runs on CUDA; skipped elsewhere unless TRITON_INTERPRET=1 is set (Triton's CPU interpreter, a
developer aid). Fresh random inputs for every case; each freshly allocated output lands in
memory that was just filled with NaN, so an element the kernel leaves unwritten fails the check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.triton_device import DEVICE, INTERPRET  # isort: skip (skips first)

from shardline.shards.kv_cache import allocate_pool
from shardline.shards.layers.activation import gelu_tanh_and_mul_torch, silu_and_mul_torch
from shardline.shards.layers.fp8 import ScaledProduct
from shardline.shards.layers.gemv_plan import RopeKV
from shardline.shards.layers.linear import linear
from shardline.shards.layers.norm import rms_norm_torch
from shardline.shards.layers.rotary import RotaryEmbedding, apply_rotary
from shardline.shards.layers.triton_activation import (
    triton_gelu_tanh_and_mul,
    triton_silu_and_mul,
)
from shardline.shards.layers.triton_gemv import gemv, gemv_applies, gemv_normed, gemv_residual
from shardline.shards.layers.triton_norm import rms_norm
from shardline.shards.layers.triton_rotary import rotate_in_place
from tests.triton_attention_helpers import KV_LAYOUTS

TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float32: 1e-6}
# The CPU interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest.
DTYPES = [torch.float16, torch.float32] if INTERPRET else [*TOLERANCE]
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _random(shape: tuple[int, ...], dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=DEVICE) * std).to(dtype)


def _poison_next_allocation(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Frees a NaN-filled block of this size, which the caching allocator hands out next."""
    if DEVICE.type == "cuda":
        filler = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        del filler


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    assert _relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 1000, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    x = _random((3, 5, hidden), dtype, std=3.0)
    residual = _random(x.shape, dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    _poison_next_allocation(x.shape, dtype)
    out = rms_norm(x, weight, 1e-6, residual)
    ref = rms_norm_torch(x, weight, 1e-6, residual)
    if residual is None:
        _assert_close(out, ref, dtype)
    else:
        assert torch.equal(out[1], ref[1])
        _assert_close(out[0], ref[0], dtype)


def _scaled_product(rows: int, width: int, dtype: torch.dtype) -> ScaledProduct:
    """An FP8 GEMM's unscaled product (magnitudes up to ~448^2 K) with its row and column scales."""
    raw = _random((rows, width), dtype, std=1e3)
    row_scale = torch.rand(rows, device=DEVICE) * 1e-2
    col_scale = torch.rand(width, device=DEVICE) * 1e-2
    return ScaledProduct(raw, row_scale, col_scale)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_applies_a_scaled_products_scales(
    dtype: torch.dtype, with_residual: bool, fp8: bool
) -> None:
    """A ScaledProduct normed (and quantized for an FP8 layer) gives bit for bit what its value
    does."""
    if fp8 and (dtype == torch.float32 or DEVICE.type != "cuda"):
        pytest.skip("FP8 rows: half precision on a GPU")
    product = _scaled_product(6, 1000, dtype)
    residual = _random((6, 1000), dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(1000, device=DEVICE)).to(dtype)
    out = rms_norm(product, weight, 1e-6, residual, fp8=fp8)
    _assert_same_tensors(out, rms_norm(product.value(), weight, 1e-6, residual, fp8=fp8))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("kernel", [triton_silu_and_mul, triton_gelu_tanh_and_mul])
@pytest.mark.parametrize("width", [2000, 2 * 14336, 2 * 16400])
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_and_mul_applies_a_scaled_products_scales(dtype, width: int, kernel, fp8: bool):
    """Gate and up read from a ScaledProduct (the FP8 rows' one- and two-pass kernels too) give
    bit for bit what its value does."""
    if fp8 and (dtype == torch.float32 or DEVICE.type != "cuda"):
        pytest.skip("FP8 rows: half precision on a GPU")
    product = _scaled_product(3, width, dtype)
    _assert_same_tensors(kernel(product, fp8=fp8), kernel(product.value(), fp8=fp8))


def _assert_same_tensors(out, expected) -> None:
    """out and expected (tensors, FP8Rows or tuples of them) hold equal tensors."""
    got, want = _tensors(out), _tensors(expected)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.float(), b.float())


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for part in out if not isinstance(part, torch.dtype) for t in _tensors(part)]


def _rotary_case(
    num_tokens: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype, scaling: dict | None
) -> tuple[torch.Tensor, torch.Tensor, RotaryEmbedding]:
    """A fused qkv output [T, q + 2 * kv heads, head_dim], positions in random order, the cache."""
    num_q, num_kv = heads
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, scaling, dtype, DEVICE)
    qkv = _random((num_tokens, num_q + 2 * num_kv, head_dim), dtype)
    positions = torch.randint(0, 512, (num_tokens,), device=DEVICE)
    return qkv, positions, rotary


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
@pytest.mark.parametrize("heads,head_dim", [((4, 4), 64), ((6, 2), 128), ((12, 3), 80)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_rotates_q_and_k_in_place_like_torch(
    dtype: torch.dtype, heads: tuple[int, int], head_dim: int, scaling: dict | None
) -> None:
    qkv, positions, rotary = _rotary_case(37, heads, head_dim, dtype, scaling)
    rotated = heads[0] + heads[1]
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    ref = apply_rotary(qkv[:, :rotated], cos, sin)
    out = qkv.clone()
    rotate_in_place(out[:, :rotated], positions, rotary.cos, rotary.sin)
    assert torch.equal(out[:, rotated:], qkv[:, rotated:]), "v heads must stay untouched"
    if dtype == torch.float32:
        _assert_close(out[:, :rotated], ref, dtype)
    else:  # the same roundings as torch: bit for bit
        assert torch.equal(out[:, :rotated], ref)


def test_rotary_module_rotates_in_place() -> None:
    qkv, positions, rotary = _rotary_case(9, (4, 2), 64, torch.float32, None)
    out = qkv.clone()
    rotary.rotate_(out[:, :6], positions)
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    _assert_close(out[:, :6], apply_rotary(qkv[:, :6], cos, sin), torch.float32)


def test_rotary_with_no_tokens_is_a_no_op() -> None:
    storage, positions, rotary = _rotary_case(4, (4, 4), 64, torch.float32, None)
    before, tables = storage.clone(), (rotary.cos.clone(), rotary.sin.clone())
    # no rows of a buffer whose rows a kernel launched anyway would rotate
    rotate_in_place(storage[:0, :8], positions[:0], rotary.cos, rotary.sin)
    assert torch.equal(storage, before)
    assert torch.equal(rotary.cos, tables[0]) and torch.equal(rotary.sin, tables[1])


@pytest.mark.parametrize(
    ("kernel", "reference"),
    [
        (triton_silu_and_mul, silu_and_mul_torch),
        (triton_gelu_tanh_and_mul, gelu_tanh_and_mul_torch),
    ],
)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 2000), (7, 2 * 8192), (40, 2 * 14336)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_and_mul_matches_torch(dtype: torch.dtype, shape: tuple[int, ...], kernel, reference):
    gate_up = _random(shape, dtype, std=3.0)
    _poison_next_allocation((*shape[:-1], shape[-1] // 2), dtype)
    _assert_close(kernel(gate_up), reference(gate_up), dtype)


# (N, K): 2 rows a program, long K (1 row of 2048), an odd N, a K of 7 x 128 (Qwen2-0.5B's 896).
GEMV_SHAPES = [(512, 2048), (256, 8192), (301, 896)] if INTERPRET else [
    (6144, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (49152, 2048), (6144, 4096),
    (4096, 14336), (301, 896),
]  # fmt: skip
HALF_DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("shape", GEMV_SHAPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_a_float64_linear(
    shape: tuple[int, int], dtype: torch.dtype, with_bias: bool
) -> None:
    weight = _random(shape, dtype, std=0.02)
    x = _random((1, shape[1]), dtype)
    bias = _random((shape[0],), dtype) if with_bias else None
    _poison_next_allocation((1, shape[0]), dtype)
    out = gemv(x, weight, bias)
    ref = torch.nn.functional.linear(
        x.double(), weight.double(), None if bias is None else bias.double()
    )
    assert out.shape == (1, shape[0]) and out.dtype == dtype
    assert _relative_error(out, ref) < TOLERANCE[dtype]


FUSED_SHAPES = [(512, 2048), (256, 8192), (302, 896)] if INTERPRET else [
    (6144, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (4096, 4096), (28672, 4096),
    (4096, 14336), (302, 896),
]  # fmt: skip


def _slot(value: float) -> torch.Tensor:
    return torch.full((), value, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("silu_pairs", [False, True])
def test_gemv_normed_matches_rms_norm_then_linear(
    shape: tuple[int, int], dtype: torch.dtype, silu_pairs: bool
) -> None:
    weight = _random(shape, dtype, std=0.02)
    bias = _random((shape[0],), dtype)
    x = _random((1, shape[1]), dtype, std=3.0)
    norm_weight = (1 + 0.1 * torch.randn(shape[1], device=DEVICE)).to(dtype)
    ss, zero = x.float().pow(2).sum(), _slot(7.0)
    x64 = x.double()  # the kernel rounds neither the normed row nor its product by the weight
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight.double()
    ref = torch.nn.functional.linear(normed, weight.double(), bias.double())
    if silu_pairs:  # SiLU * up of the rounded projection, as the unfused layers
        ref = silu_and_mul_torch(ref.to(dtype)).double()
    _poison_next_allocation(tuple(ref.shape), dtype)
    out = gemv_normed(x, ss, norm_weight, 1e-5, weight, bias, silu_pairs, zero)
    assert out.shape == ref.shape and out.dtype == dtype
    assert _relative_error(out, ref) < TOLERANCE[dtype]
    assert zero.item() == 0.0


@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gemv_residual_adds_the_residual_and_its_sum_of_squares(
    shape: tuple[int, int], dtype: torch.dtype
) -> None:
    weight = _random(shape, dtype, std=0.02)
    x, residual = _random((1, shape[1]), dtype), _random((1, shape[0]), dtype, std=3.0)
    ss = _slot(0.0)
    _poison_next_allocation(residual.shape, dtype)
    out = gemv_residual(x, weight, residual, ss)
    ref = residual.double() + torch.nn.functional.linear(x.double(), weight.double())
    assert out.shape == residual.shape and out.dtype == dtype
    assert _relative_error(out, ref) < TOLERANCE[dtype]
    torch.testing.assert_close(ss, out.float().pow(2).sum(), rtol=1e-5, atol=0)


# (q heads, KV heads, head_dim, K): the 8B shape's qkv, a small one, a long K (2 rows a program)
ROPE_KV_SHAPES = [(4, 2, 64, 512)] if INTERPRET else [
    (32, 8, 128, 4096), (4, 2, 64, 896), (8, 2, 128, 8192),
]  # fmt: skip
CACHE_DTYPES = [None] if INTERPRET else [None, torch.float8_e4m3fn]  # None: the model's


def _rope_kv_case(
    shape: tuple[int, int, int, int], dtype: torch.dtype, cache_dtype: torch.dtype | None,
    slot: int, keys_major: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RotaryEmbedding, RopeKV]:  # fmt: skip
    """x, the qkv weight and bias, the rotary embedding and a ROPE_KV into zeroed caches."""
    heads, kv_heads, head_dim, k = shape
    n = (heads + 2 * kv_heads) * head_dim
    weight, bias = _random((n, k), dtype, std=0.02), _random((n,), dtype)
    x = _random((1, k), dtype)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, LLAMA3_SCALING, dtype, DEVICE)
    pools, cache_dtype = (3, 16, kv_heads, head_dim), cache_dtype or dtype
    k_cache = allocate_pool(pools, dtype=cache_dtype, device=DEVICE)
    v_cache = allocate_pool(pools, dtype=cache_dtype, device=DEVICE, keys_major=keys_major)
    rotation = (torch.tensor([37], device=DEVICE), rotary.cos, rotary.sin)
    slots = torch.tensor([slot], device=DEVICE)
    rope_kv = RopeKV(*rotation, k_cache, v_cache, slots, heads)
    return x, weight, bias, rotary, rope_kv


@KV_LAYOUTS
@pytest.mark.parametrize("shape", ROPE_KV_SHAPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("slot", [21, -1])
def test_gemv_rope_kv_rotates_q_and_k_and_writes_k_and_v_to_the_cache(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
    slot: int,
    keys_major: bool,
) -> None:
    """As the plain GEMV, then the rotary embedding, then the cache write (negative slots
    skipped): the batch-1 qkv projection's ROPE_KV epilogue."""
    heads, kv_heads, head_dim, _ = shape
    x, weight, bias, rotary, rope_kv = _rope_kv_case(shape, dtype, cache_dtype, slot, keys_major)
    n = weight.shape[0]
    _poison_next_allocation((1, n), dtype)
    out = gemv(x, weight, bias, rope_kv=rope_kv)
    plain = gemv(x, weight, bias).view(1, -1, head_dim)
    rotary.rotate_(plain[:, : heads + kv_heads], rope_kv.position)
    _assert_close(out, plain.view(1, n), dtype)
    caches = (rope_kv.k_cache, rope_kv.v_cache)
    written = out.view(-1, head_dim)[heads:].view(2, kv_heads, head_dim).to(caches[0].dtype)
    for cache, expected in zip(caches, written, strict=True):
        if slot >= 0:  # the cache holds exactly the output's (rotated) k and v heads
            assert torch.equal(cache[slot // 16, slot % 16].float(), expected.float())
            cache[slot // 16, slot % 16] = 0
        assert not cache.float().any()


def test_gemv_rope_kv_writes_nan_values_as_zero_into_a_keys_major_cache() -> None:
    heads, kv_heads, head_dim, _ = shape = ROPE_KV_SHAPES[0]
    x, weight, bias, _, rope_kv = _rope_kv_case(shape, torch.float16, None, 21, True)
    bias[heads * head_dim :: 5] = float("nan")  # k and v elements
    out = gemv(x, weight, bias, rope_kv=rope_kv)
    k, v = out.view(-1, head_dim)[heads:].view(2, kv_heads, head_dim)
    assert k.isnan().any() and v.isnan().any()
    torch.testing.assert_close(rope_kv.k_cache[1, 5], k, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(rope_kv.v_cache[1, 5], v.nan_to_num(0.0))


def test_gemv_applies_to_one_half_precision_row_it_can_tile() -> None:
    weight = _random((64, 256), torch.float16)
    row = _random((1, 256), torch.float16)
    assert gemv_applies(row, weight) == (DEVICE.type == "cuda")
    assert not gemv_applies(torch.cat([row, row]), weight)
    assert not gemv_applies(row.float(), weight.float())
    torch.testing.assert_close(linear(row, weight), torch.nn.functional.linear(row, weight))


def _seeded_bf16(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=DEVICE).to(torch.bfloat16)


def _tiny_llama_decode(
    tmp_path: Path,
    context_lens: list[int],
    architecture: str = "llama",
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.nn.Module, tuple]:
    """A Llama-layered model on the Triton backend and the arguments of one decode step: the
    same weights and cache contents (seeded) at every dtype."""
    from shardline.shards.layers.attention import AttentionMetadata, get_attention_backend
    from shardline.shards.models import load_model
    from shardline.shards.utils.dist import TPGroup
    from tests.model_factory import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(
        architecture=architecture, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2
    )
    model = load_model(
        build_tiny_model(tmp_path / str(dtype), spec),
        dtype=dtype,
        device=DEVICE,
        tp=TPGroup(),
        attention_backend=get_attention_backend("triton", DEVICE),
    )
    cache_shape = (4, 16, spec.num_kv_heads, spec.hidden_size // spec.num_heads)
    generator = torch.Generator(DEVICE).manual_seed(0)
    kv_caches = [
        tuple(_seeded_bf16(cache_shape, generator).to(dtype) for _ in range(2))
        for _ in range(spec.num_layers)
    ]
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    meta = AttentionMetadata(
        is_prefill=False,
        slot_mapping=torch.tensor([0 * 16 + 4, 3 * 16 + 3][: len(context_lens)], device=DEVICE),
        block_tables=torch.tensor(
            [[0, 1], [2, 3]][: len(context_lens)], dtype=torch.int32, device=DEVICE
        ),
        context_lens=lens,
    )
    input_ids = torch.tensor([3, 7][: len(context_lens)], device=DEVICE)
    return model, (input_ids, (lens - 1).long(), kv_caches, meta)


@pytest.mark.skipif(INTERPRET, reason="counts CUDA kernel launches")
@pytest.mark.parametrize("context_lens,per_layer", [([5, 20], 16), ([20], 5)])
def test_decode_forward_launches_few_kernels_per_layer(
    tmp_path: Path, context_lens: list[int], per_layer: int
) -> None:
    """A bf16 decode step of a Llama model on the Triton backend: about one kernel per op.
    Per layer: 2 norms, 4 GEMMs, rotary + KV write, decode attention (+ its split merge),
    SiLU * up = 9-10 (cuBLAS may add a split-K reduction); the torch paths took about 40. At
    batch 1 the norms, SiLU * up and the rotary + KV write fold into the GEMVs: 5 (the short
    context takes no split)."""
    from torch.profiler import ProfilerActivity, profile

    model, args = _tiny_llama_decode(tmp_path, context_lens)
    with torch.inference_mode():
        model(*args)  # compiles the kernels
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            hidden = model(*args)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert torch.isfinite(hidden).all()
    assert 0 < len(kernels) <= per_layer * len(model.layers) + 4, sorted(e.name for e in kernels)


@pytest.mark.skipif(INTERPRET, reason="the fused path needs a CUDA model")
@pytest.mark.parametrize("architecture", ["llama", "qwen3", "phi3"])
def test_fused_batch_1_decode_matches_the_unfused_forward(
    tmp_path: Path, architecture: str
) -> None:
    """Qwen3's q/k norms and Phi-3's split fused projections ride the fused path too. Both
    paths round differently (the fused GEMVs round no normed row), so each is held against the
    same model in float32: through these 4 layers of large random weights bf16 strays 1-4 %
    (Triton's interpreter with round-to-nearest bf16, 4 cache seeds: fused 1.3-3.6 %, unfused
    1.1-2.8 %, from each other 1.2-2.5 %); the fused path must be about as close."""
    model, args = _tiny_llama_decode(tmp_path, [20], architecture)
    exact_model, exact_args = _tiny_llama_decode(tmp_path, [20], architecture, torch.float32)
    assert model.fused_decode
    with torch.inference_mode():
        fused = model(*args)
        fused_again = model(*args)
        model.fused_decode = False
        unfused = model(*args)
        exact = exact_model(*exact_args)
    assert _relative_error(fused_again, fused) < 1e-3  # a slot left unzeroed doubles 1 / rms^2
    assert _relative_error(fused, exact) < 1.5 * _relative_error(unfused, exact) + 5e-3
