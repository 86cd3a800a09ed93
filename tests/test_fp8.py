"""FP8 weights on CPU through the reference path: quantized at load and every published
checkpoint format against the unquantized model, checkpoints against their dequantized twins
(greedy tokens equal transformers'), tensor parallelism over gloo against one rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from aiohttp.test_utils import unused_port

from shardline.shards.layers.activation import silu_and_mul
from shardline.shards.layers.attention import get_attention_backend
from shardline.shards.layers.fp8 import (
    FP8,
    ScaledProduct,
    dense,
    dequantize_rows,
    fp8_linear,
    quantize_rows,
)
from shardline.shards.layers.norm import RMSNorm
from shardline.shards.models import CausalLM, load_model
from shardline.shards.utils.dist import TPGroup, init_distributed
from shardline.shards.utils.fp8_weights import read_lm_head
from shardline.shards.utils.quantization import (
    FP8_LM_HEAD_VARIABLE,
    UnsupportedQuantizationError,
    checkpoint_format,
    weight_format,
)
from shardline.shards.utils.weights import Weights
from tests.fp8_checkpoints import (
    BLOCK,
    FORMATS,
    compressed_tensors_config,
    write_dequantized_twin,
    write_fp8_checkpoint,
)
from tests.model_factory import TinyModelSpec, build_tiny_model
from tests.shard_harness import leave_process_group
from tests.test_model_forward import prompts, run_engine, transformers_reference

CPU = torch.device("cpu")
SPEC = TinyModelSpec(
    architecture="llama", num_heads=8, num_kv_heads=4, seed=11, initializer_range=0.05
)
BLOCK_SIZE = 4
DECODE_STEPS = 3
# The logits' error relative to their norm: FP8 (3 mantissa bits) rounds each weight by up to
# 6 %; over the tiny model's layers the logits move by 6-8 % (a scale misplaced: 100 % and more).
FP8_TOLERANCE = 0.12
AT_LOAD_NAME = "quantized-at-load"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def load(model_dir: Path, quantize: str | None = None, tp: TPGroup | None = None) -> CausalLM:
    return load_model(
        model_dir,
        dtype=torch.float32,
        device=CPU,
        tp=tp or TPGroup(),
        attention_backend=get_attention_backend("torch", CPU),
        quantization=weight_format(model_dir, quantize),
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model, each FP8 checkpoint of it and each checkpoint's dequantized twin."""
    root = tmp_path_factory.mktemp("fp8")
    base = build_tiny_model(root / "base", SPEC)
    dirs = {"base": base}
    for fmt in FORMATS:
        dirs[fmt] = write_fp8_checkpoint(base, root / fmt, fmt)
        dirs[f"{fmt}-twin"] = write_dequantized_twin(dirs[fmt], root / f"{fmt}-twin")
    return dirs


@pytest.fixture(scope="module")
def reference(model_dirs: dict[str, Path]) -> tuple[list[list[int]], list[list[int]], list]:
    """Prompts, the tokens fed at each decode step and the unquantized model's logits."""
    prompt_ids = prompts(load(model_dirs["base"]).config.vocab_size, seed=2)
    expected, fed = transformers_reference(model_dirs["base"], prompt_ids, DECODE_STEPS)
    return prompt_ids, fed, expected


def test_rows_quantize_to_within_fp8_rounding() -> None:
    x = torch.randn(6, 40) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0.0
    quantized, scale = quantize_rows(x)
    assert quantized.dtype == FP8 and scale.shape == (6,)
    assert torch.equal(
        quantized.float().abs().amax(dim=1)[[0, 1, 3, 4, 5]], torch.full((5,), 448.0)
    )
    back = dequantize_rows(quantized, scale)
    assert torch.all((back - x).abs() <= x.abs() / 16 + scale[:, None] * 2**-9)
    assert torch.equal(back[2], torch.zeros(40))


def test_the_reference_linear_dequantizes_the_weight() -> None:
    weight, x, bias = torch.randn(24, 32), torch.randn(3, 5, 32), torch.randn(24)
    quantized, scale = quantize_rows(weight)
    expected = torch.nn.functional.linear(x, dequantize_rows(quantized, scale), bias)
    torch.testing.assert_close(fp8_linear(x, quantized, scale, bias), expected)
    deferred = fp8_linear(x, quantized, scale, bias, defer_scales=True)  # no FP8 GEMM here
    torch.testing.assert_close(deferred, expected)


def test_a_scaled_product_reads_as_its_value_on_the_torch_paths() -> None:
    """Off the GPU kernels an RMSNorm or SiLU * up given a ScaledProduct reads its value."""
    raw = (torch.randn(3, 32) * 1e3).to(torch.bfloat16)
    product = ScaledProduct(raw, torch.rand(3) * 1e-2, torch.rand(32) * 1e-2)
    value = product.value()
    scaled = raw.float() * product.row_scale[:, None] * product.col_scale[None, :]
    assert value.dtype == torch.bfloat16 and torch.equal(value, scaled.to(torch.bfloat16))
    assert torch.equal(dense(product), value) and dense(value) is value
    norm, residual = RMSNorm(torch.rand(32).to(torch.bfloat16), 1e-6), torch.randn(3, 32)
    for got, want in zip(norm(product, residual.bfloat16()), norm(value, residual.bfloat16())):
        assert torch.equal(got, want)
    assert torch.equal(norm(product), norm(value))
    assert torch.equal(silu_and_mul(product), silu_and_mul(value))


@pytest.mark.parametrize("fmt", [AT_LOAD_NAME, *FORMATS])
def test_fp8_logits_match_the_unquantized_model(model_dirs, reference, fmt: str) -> None:
    prompt_ids, fed, expected = reference
    model_dir, quantize = (
        (model_dirs["base"], "fp8") if fmt == AT_LOAD_NAME else (model_dirs[fmt], None)
    )
    model = load(model_dir, quantize)
    assert model.layers[0].mlp.down_proj.weight.dtype == FP8
    # the LM head as the checkpoint stores it; --quantize fp8 leaves it unquantized
    head_dtype = FP8 if fmt.endswith("-head") else torch.float32
    assert model.lm_head.weight.dtype == head_dtype
    for step, (actual, logits) in enumerate(
        zip(run_engine(model, prompt_ids, fed, BLOCK_SIZE), expected, strict=True)
    ):
        assert relative_error(actual, logits) < FP8_TOLERANCE, f"step {step}"


@pytest.mark.parametrize("fmt", [AT_LOAD_NAME, "compressed-tensors-channel"])
def test_the_lm_head_is_quantized_at_load_when_asked(model_dirs, reference, monkeypatch, fmt):
    """SHARDLINE_FP8_LM_HEAD=1: the full-precision LM head of --quantize fp8 or of a checkpoint
    that ignored it quantized per vocabulary row, the logits within FP8's error."""
    prompt_ids, fed, expected = reference
    monkeypatch.setenv(FP8_LM_HEAD_VARIABLE, "1")
    model_dir, quantize = (
        (model_dirs["base"], "fp8") if fmt == AT_LOAD_NAME else (model_dirs[fmt], None)
    )
    assert weight_format(model_dir, quantize).description.endswith("LM head quantized at load)")
    model = load(model_dir, quantize)
    assert model.lm_head.weight.dtype == FP8 and model.lm_head.weight_scale.dtype == torch.float32
    for step, (actual, logits) in enumerate(
        zip(run_engine(model, prompt_ids, fed, BLOCK_SIZE), expected, strict=True)
    ):
        assert relative_error(actual, logits) < FP8_TOLERANCE, f"step {step}"


@pytest.mark.parametrize(("world_size", "head_dtype"), [(2, FP8), (5, torch.float32)])
def test_an_fp8_lm_head_shard_is_padded_or_dequantized(model_dirs, world_size, head_dtype):
    """Each rank's vocabulary rows, zero rows past the vocabulary; rows per rank that the FP8
    GEMM cannot take (384 / 5 -> 77, not a multiple of 16) come dequantized."""
    fmt = "compressed-tensors-channel-head"
    model_dir = model_dirs[fmt]
    twin = Weights(model_dirs[f"{fmt}-twin"], dtype=torch.float32, device=CPU, tp=TPGroup())
    full = twin.get_tensor("lm_head.weight")
    last = world_size - 1
    quantization = weight_format(model_dir, None)
    weights = Weights(
        model_dir, dtype=torch.float32, device=CPU, tp=TPGroup(last, world_size),
        quantization=quantization,
    )  # fmt: skip
    head = read_lm_head(weights, "lm_head.weight")
    rows = -(-full.shape[0] // world_size)
    assert head.weight.dtype == head_dtype and head.weight.shape == (rows, full.shape[1])
    values = head.weight if head.scale is None else dequantize_rows(head.weight, head.scale)
    mine = full[last * rows :]
    torch.testing.assert_close(values[: len(mine)], mine, rtol=1e-6, atol=1e-7)
    assert not values[len(mine) :].any()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_checkpoints_equal_their_dequantized_twins(model_dirs, reference, fmt: str) -> None:
    """The twin's greedy tokens (transformers') at every step, and the twin's logits: exactly
    its weights where scales are per row or tensor; a block-scaled checkpoint is requantized per
    row at load, as the twin is with --quantize fp8."""
    prompt_ids, fed, _ = reference
    twin_dir = model_dirs[f"{fmt}-twin"]
    if fmt.endswith("-block"):
        expected = run_engine(load(twin_dir, "fp8"), prompt_ids, fed, BLOCK_SIZE)
    else:
        expected, fed = transformers_reference(twin_dir, prompt_ids, DECODE_STEPS)
    actual = run_engine(load(model_dirs[fmt]), prompt_ids, fed, BLOCK_SIZE)
    greedy = [[logits.argmax(-1).tolist() for logits in run] for run in (actual, expected)]
    assert greedy[0] == greedy[1]
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=f"step {step}")


TP_CASES = (
    AT_LOAD_NAME,
    "fp8-block",
    "compressed-tensors-block",
    "compressed-tensors-tensor",
    "compressed-tensors-channel-head",
)


def _tp_case(model_dirs: dict[str, Path], case: str) -> tuple[Path, str | None]:
    return (model_dirs["base"], "fp8") if case == AT_LOAD_NAME else (model_dirs[case], None)


def _rank_main(
    rank: int,
    port: int,
    model_dirs: dict[str, Path],
    prompt_ids: list[list[int]],
    fed: list[list[int]],
    out_dir: Path,
) -> None:
    torch.set_num_threads(1)
    tp = init_distributed(rank, 2, "127.0.0.1", port, CPU)
    results = {
        case: run_engine(load(*_tp_case(model_dirs, case), tp=tp), prompt_ids, fed, BLOCK_SIZE)
        for case in TP_CASES
    }
    torch.save(results, out_dir / f"rank{rank}.pt")
    leave_process_group()


def test_two_ranks_over_gloo_equal_one(tmp_path: Path, model_dirs, reference) -> None:
    """Row-parallel layers take their columns of weights quantized by whole rows, so both ranks
    hold the single rank's FP8 values and scales."""
    prompt_ids, fed, _ = reference
    mp.spawn(_rank_main, args=(unused_port(), model_dirs, prompt_ids, fed, tmp_path), nprocs=2)
    for case in TP_CASES:
        single = run_engine(load(*_tp_case(model_dirs, case)), prompt_ids, fed, BLOCK_SIZE)
        for rank in range(2):
            per_step = torch.load(tmp_path / f"rank{rank}.pt")[case]
            for step, (a, e) in enumerate(zip(per_step, single, strict=True)):
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=f"{case} r{rank} {step}")


def test_unsupported_formats_are_refused_by_name(model_dirs) -> None:
    """A compressed-tensors scheme other than FP8 channel/tensor, and an FP8 tensor read by a
    layer that does not apply scales (instead of garbage weights)."""
    int4 = compressed_tensors_config("group")
    int4["config_groups"]["group_0"]["weights"] |= {"num_bits": 4, "type": "int", "group_size": 128}
    int4["format"] = "pack-quantized"
    with pytest.raises(UnsupportedQuantizationError, match="format 'pack-quantized'"):
        checkpoint_format(int4)
    assert weight_format(model_dirs["fbgemm_fp8"], "fbgemm_fp8").method == "fbgemm_fp8"
    assert weight_format(model_dirs["fp8-block"], "fp8").block == BLOCK  # fp8 takes any FP8
    for model_dir, quantize in (("base", "compressed-tensors"), ("fp8-block", "fbgemm_fp8")):
        with pytest.raises(UnsupportedQuantizationError, match=f"quantization '{quantize}'"):
            weight_format(model_dirs[model_dir], quantize)
    weights = Weights(model_dirs["fbgemm_fp8"], dtype=torch.float32, device=CPU, tp=TPGroup())
    with pytest.raises(UnsupportedQuantizationError, match="down_proj.weight is stored in FP8"):
        weights.get_tensor("model.layers.0.mlp.down_proj.weight")
