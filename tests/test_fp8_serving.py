"""The FP8 KV cache on CPU (torch attention reads it; the checkpoint's k/v scales applied around
it; twice the tokens of a half-precision cache) and FP8 served end to end: the engine's /info
facts and warmup sizing, the offline LLM on a checkpoint and on weights quantized at load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardline import LLM, SamplingParams
from shardline.proto import generate_pb2 as pb
from shardline.shard_config import ShardConfig
from shardline.shards.bootstrap import create_engine
from shardline.shards.layers.attention.fp8_kv import KVScales
from shardline.shards.models import CausalLM
from tests.fp8_checkpoints import add_kv_scales, write_dequantized_twin, write_fp8_checkpoint
from tests.model_factory import build_tiny_model
from tests.test_fp8 import BLOCK_SIZE, DECODE_STEPS, SPEC, load, relative_error
from tests.test_model_forward import PagedSequences, prompts, run_engine, transformers_reference

KV_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# Keys and values rounded to 3 (e4m3) or 2 (e5m2) mantissa bits move the tiny model's logits by
# about 3 % and 6 %.
KV_TOLERANCE = {"fp8_e4m3fn": 0.05, "fp8_e5m2": 0.1}
K_SCALE, V_SCALE = 0.25, 4.0  # powers of two: dividing by them is exact in FP8


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8-serving")
    base = build_tiny_model(root / "base", SPEC)
    checkpoint = write_fp8_checkpoint(base, root / "ct", "compressed-tensors-channel")
    return {
        "base": base,
        "kv-scaled": add_kv_scales(base, root / "kv-scaled", K_SCALE, V_SCALE),
        "kv-scaled-autofp8": add_kv_scales(
            base, root / "autofp8", K_SCALE, V_SCALE, ("k_proj.output_scale", "v_proj.output_scale")
        ),
        "checkpoint": checkpoint,
        "twin": write_dequantized_twin(checkpoint, root / "twin"),
    }


@pytest.mark.parametrize("kv_cache_dtype", list(KV_DTYPES))
def test_an_fp8_kv_cache_keeps_the_logits_within_tolerance(model_dirs, kv_cache_dtype) -> None:
    prompt_ids = prompts(load(model_dirs["base"]).config.vocab_size, seed=4)
    expected, fed = transformers_reference(model_dirs["base"], prompt_ids, DECODE_STEPS)
    actual = run_engine(
        load(model_dirs["base"]), prompt_ids, fed, BLOCK_SIZE, KV_DTYPES[kv_cache_dtype]
    )
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert relative_error(a, e) < KV_TOLERANCE[kv_cache_dtype], f"step {step}"


def _prefilled_cache(model: CausalLM, prompt_ids: list[list[int]]) -> list:
    paged = PagedSequences(model, BLOCK_SIZE, kv_dtype=torch.float8_e4m3fn)
    meta = paged.prefill_meta([len(p) for p in prompt_ids])
    positions = torch.tensor([pos for p in prompt_ids for pos in range(len(p))])
    with torch.inference_mode():
        model(torch.tensor([t for p in prompt_ids for t in p]), positions, paged.kv_caches, meta)
    return paged.kv_caches


def test_the_checkpoints_kv_scales_divide_what_the_cache_holds(model_dirs) -> None:
    """k / k_scale and v / v_scale in the cache; the attention undoes them."""
    scaled_model, plain_model = load(model_dirs["kv-scaled"]), load(model_dirs["base"])
    assert scaled_model.layers[0].self_attn.attention.kv_scales == KVScales(K_SCALE, V_SCALE)
    autofp8 = load(model_dirs["kv-scaled-autofp8"])
    assert autofp8.layers[1].self_attn.attention.kv_scales == KVScales(K_SCALE, V_SCALE)
    prompt_ids = prompts(plain_model.config.vocab_size, seed=5)
    layers = zip(
        _prefilled_cache(scaled_model, prompt_ids),
        _prefilled_cache(plain_model, prompt_ids),
        strict=True,
    )
    for (k, v), (plain_k, plain_v) in layers:
        torch.testing.assert_close(k.float() * K_SCALE, plain_k.float(), atol=2**-9, rtol=0)
        torch.testing.assert_close(v.float() * V_SCALE, plain_v.float(), atol=2**-7, rtol=0)
    fed = [[1, 2, 3]] * DECODE_STEPS
    fp8 = torch.float8_e4m3fn
    scaled = run_engine(scaled_model, prompt_ids, fed, BLOCK_SIZE, fp8)
    for a, e in zip(scaled, run_engine(plain_model, prompt_ids, fed, BLOCK_SIZE, fp8), strict=True):
        assert relative_error(a, e) < 0.01  # apart from values near FP8's subnormal range


def _warmed_engine(model_dir: Path, **settings: str) -> tuple[pb.InfoResponse, int]:
    engine = create_engine(ShardConfig(model=str(model_dir), kv_cache_bytes=1 << 16, **settings))
    warmup = engine.warmup(pb.WarmupRequest(max_prefill_tokens=32, max_total_tokens=64))
    return engine.info(), warmup.max_supported_total_tokens


def test_the_engine_reports_fp8_and_an_fp8_cache_holds_more_tokens(model_dirs) -> None:
    """On CPU the model runs in float32: one byte per cached value holds 4x the tokens (2x those
    of a bfloat16 cache on GPU)."""
    info, tokens = _warmed_engine(model_dirs["base"], quantization="fp8", kv_cache_dtype="fp8")
    assert (info.quantize, info.kv_cache_dtype) == ("fp8", "float8_e4m3fn")
    plain_info, plain_tokens = _warmed_engine(model_dirs["base"])
    assert (plain_info.quantize, plain_info.kv_cache_dtype) == ("", "float32")
    assert tokens == 4 * plain_tokens
    checkpoint_info, _ = _warmed_engine(model_dirs["checkpoint"], kv_cache_dtype="fp8_e5m2")
    assert (checkpoint_info.quantize, checkpoint_info.kv_cache_dtype) == (
        "compressed-tensors",
        "float8_e5m2",
    )


def _greedy(llm: LLM, prompt: str) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def test_the_offline_llm_serves_a_checkpoint_as_its_dequantized_twin(model_dirs) -> None:
    options = dict(block_size=BLOCK_SIZE, kv_cache_bytes=1 << 18, max_model_len=64)
    prompt = "the quick brown fox"
    checkpoint = _greedy(LLM(model=str(model_dirs["checkpoint"]), **options), prompt)
    assert checkpoint == _greedy(LLM(model=str(model_dirs["twin"]), **options), prompt)
    fp8 = LLM(model=str(model_dirs["base"]), quantization="fp8", kv_cache_dtype="fp8", **options)
    samples = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    outputs = fp8.generate([prompt], samples, use_tqdm=False)[0].outputs
    assert [len(output.token_ids) for output in outputs] == [6, 6]
