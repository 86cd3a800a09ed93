"""The offline benchmark's floor arithmetic, and its step log on a real engine."""

import json

import pytest

from benchmarks.offline_floor import (
    Call,
    Ceilings,
    ModelShape,
    StepLog,
    achieved_rates,
    causal_pairs,
    phase_breakdown,
    workload_floor,
)
from benchmarks.random_model import config_for
from shardline import SamplingParams

SHAPE_8B = ModelShape.from_config(config_for("8b"))
UNIT = Ceilings(matmul_flops=1e12, bytes_s=1e12)


def test_8b_shape_matches_llama_3_1_8b():
    assert SHAPE_8B.linear_params == 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    assert SHAPE_8B.kv_bytes_per_token == 128 * 1024  # 32 layers x K,V x 8 heads x 128 x bf16
    assert SHAPE_8B.weight_bytes == 2 * (SHAPE_8B.linear_params + 128000 * 4096)


def test_fp8_storage_halves_the_projections_and_cache_but_not_a_16_bit_head():
    fp8 = SHAPE_8B.stored_as(weight_bytes=1, head_bytes=2, kv_bytes=1)
    assert fp8.kv_bytes_per_token == 64 * 1024
    assert fp8.weight_bytes == SHAPE_8B.linear_params + 2 * 128000 * 4096
    assert fp8.linear_params == SHAPE_8B.linear_params  # the FLOPs stay


def test_workload_floor_counts_each_token_and_kv_read_once():
    # One request: 3 prompt tokens, 4 output tokens (the first from prefill, 3 decode steps
    # reading 3+1, 3+2, 3+3 cached tokens = 15 token-reads).
    floor = workload_floor(SHAPE_8B, [(3, 4)], UNIT)
    gemm = 2 * (SHAPE_8B.linear_params * 6 + SHAPE_8B.lm_head_params * 4) / 1e12
    assert floor["kv_read_tokens"] == 15
    assert floor["gemm_s"] == round(gemm, 3)
    assert floor["kv_read_s"] == round(15 * 128 * 1024 / 1e12, 3)
    chain = 4 * SHAPE_8B.weight_bytes / 1e12  # four sequential passes, each reading every weight
    assert floor["longest_chain_s"] == round(chain, 3)
    assert floor["floor_s"] == round(max(chain, gemm + floor["prefill_attention_s"]), 3)


def test_call_floor_is_weight_bound_small_and_compute_bound_large():
    one_row = Call("decode", 1, 0, 0, 0, 0.0)
    assert one_row.floor_s(SHAPE_8B, UNIT) == pytest.approx(SHAPE_8B.weight_bytes / 1e12)
    big = Call("decode", 4096, 0, 0, 0, 0.0)
    assert big.floor_s(SHAPE_8B, UNIT) == pytest.approx(SHAPE_8B.gemm_flops(4096, 4096) / 1e12)
    assert causal_pairs(prefix=2, new=3) == 3 * 2 + 6


def test_fp8_projections_run_at_the_fp8_rate_and_the_lm_head_at_the_16_bit_one():
    measured = {"matmul_flops": 1e12, "copy_bytes_s": 1e12, "fp8_matmul_flops": 2e12}
    fp8 = Ceilings.of(measured, fp8_linears=True)
    assert fp8 == Ceilings(matmul_flops=1e12, bytes_s=1e12, linear_flops=2e12)
    assert Ceilings.of(measured) == UNIT  # a bf16 run's projections: the 16-bit rate
    no_fp8_gemm = Ceilings.of({"matmul_flops": 1e12, "copy_bytes_s": 1e12}, fp8_linears=True)
    assert no_fp8_gemm.linear_rate == 1e12
    seconds = SHAPE_8B.gemm_seconds(tokens=10, logit_rows=2, ceil=fp8)
    expected = 2 * SHAPE_8B.linear_params * 10 / 2e12 + 2 * SHAPE_8B.lm_head_params * 2 / 1e12
    assert seconds == pytest.approx(expected)
    big = Call("decode", 4096, 0, 0, 0, 0.0)
    assert big.floor_s(SHAPE_8B, fp8) == pytest.approx(SHAPE_8B.gemm_seconds(4096, 4096, fp8))


def test_step_log_records_every_engine_call(llm, tiny_llama_dir):
    shape = ModelShape.from_config(json.loads((tiny_llama_dir / "config.json").read_text()))
    log = StepLog.attach(llm._shards.engine)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    params = SamplingParams(temperature=0, max_tokens=4, min_tokens=4, ignore_eos=True)
    llm.generate(sampling_params=params, prompt_token_ids=prompts, use_tqdm=False)
    log.detach()
    assert sum(call.prompt_tokens for call in log.calls) == 8
    decodes = [call for call in log.calls if call.kind == "decode"]
    assert decodes and all(call.context_tokens >= 8 for call in decodes if call.decode_rows == 2)
    wall = sum(call.seconds for call in log.calls) + 0.5
    phases = phase_breakdown(log.calls, wall, shape, UNIT)
    assert sum(phase["calls"] for phase in phases.values()) == len(log.calls)
    gaps = phases["host gaps between calls"]
    assert gaps["seconds"] == pytest.approx(0.5, abs=1e-3)
    measured_gaps = sum(call.gap_before_s for call in log.calls)
    assert 0 <= gaps["ahead_in_flight_s"] <= measured_gaps + 1e-3
    # On CPU too, a decode sent with nothing expected to join launches the next step ahead.
    assert any(call.ahead_in_flight for call in decodes)
    launches = [call for call in decodes if call.launch_s > 0]
    assert launches and all(0 <= call.launch_off_cpu_s <= call.launch_s for call in launches)
    assert gaps["launch_ahead_s"] == pytest.approx(sum(c.launch_s for c in launches), abs=1e-3)


def test_achieved_rates_divide_each_call_kinds_work_by_its_kernels_seconds():
    shape = ModelShape(32, 32, 128, 10**9, 10**8, 2 * 10**9 + 2 * 10**8, 131_072)
    calls = [
        Call("prefill", 0, 1000, 0, 0, 0.1),
        Call("mixed", 9, 990, 4000, 0, 0.1),
        Call("decode", 100, 0, 50_000, 0, 0.01),
        Call("decode", 100, 0, 50_000, 0, 0.01),
    ]
    by_call = {
        "prefill": {"classes_s": {"gemm": 0.002}},
        "mixed": {"classes_s": {"gemm": 0.002, "attention": 0.001}},
        "decode": {"classes_s": {"gemm": 0.001, "attention": 0.002}},
        "decode launched ahead": {"classes_s": {"gemm": 0.001, "attention": 0.002}},
    }
    rates = achieved_rates(by_call, calls, shape)
    # 2 x (1e9 x 1000 + 1e8 x 1) + 2 x (1e9 x 999 + 1e8 x 10) FLOPs in 4 ms
    flops = 2 * (1e9 * 1000 + 1e8) + 2 * (1e9 * 999 + 1e8 * 10)
    assert rates["prefill_gemm_tflop_s"] == pytest.approx(flops / 0.004 / 1e12, abs=0.1)
    assert rates["decode_gemm_weight_gb_s"] == pytest.approx(2 * 2.2e9 / 0.002 / 1e9, abs=0.1)
    assert rates["decode_attention_kv_gb_s"] == pytest.approx(1e5 * 131_072 / 0.004 / 1e9, abs=0.1)
    assert achieved_rates({}, calls, shape)["prefill_gemm_tflop_s"] is None
