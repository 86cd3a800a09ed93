"""The paged decode call's schedule and tiling (decode_plan.py), from shapes alone."""

from __future__ import annotations

import pytest
import torch

from shardline.shards.layers.attention.decode_plan import (
    BALANCED_PROGRAMS_PER_SM,
    MAX_SPLITS,
    BalancedPlan,
    DecodeConfig,
    SplitPlan,
    default_decode_config,
    plan_decode,
    plan_splits,
)

SMS, KV_HEADS, MAX_TOKENS = 132, 8, 8192
FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("cache", [torch.bfloat16, torch.float16])
def test_a_half_precision_cache_is_balanced_once_the_batch_fills_the_gpu(cache) -> None:
    config = default_decode_config(torch.bfloat16, cache, fills_gpu=True)
    for batch in (17, 64, 512, 4096):  # 17 x 8 KV heads >= 132 SMs
        plan = plan_decode(batch, KV_HEADS, MAX_TOKENS, config, cache, SMS)
        assert plan == BalancedPlan(BALANCED_PROGRAMS_PER_SM)
    small = default_decode_config(torch.bfloat16, cache)
    assert plan_decode(16, KV_HEADS, MAX_TOKENS, small, cache, SMS) == SplitPlan(5)
    assert plan_decode(1, KV_HEADS, MAX_TOKENS, small, cache, SMS) == SplitPlan(MAX_SPLITS)


def test_an_fp8_cache_and_float32_keep_the_split_kernel() -> None:
    fp8 = default_decode_config(torch.bfloat16, FP8, fills_gpu=True)
    assert plan_decode(256, KV_HEADS, MAX_TOKENS, fp8, FP8, SMS) == SplitPlan(1)
    exact = default_decode_config(torch.float32)
    assert plan_decode(256, KV_HEADS, MAX_TOKENS, exact, torch.float32, SMS) == SplitPlan(1)


def test_tilings_by_dtype_and_batch() -> None:
    assert default_decode_config(torch.bfloat16) == DecodeConfig(64, 4, 2)
    assert default_decode_config(torch.bfloat16, fills_gpu=True) == DecodeConfig(64, 4, 5)
    assert default_decode_config(torch.bfloat16, FP8) == DecodeConfig(128, 4, 2)
    assert default_decode_config(torch.bfloat16, FP8, fills_gpu=True) == DecodeConfig(128, 4, 5)
    assert default_decode_config(torch.float32, fills_gpu=True) == DecodeConfig(block_n=32)


def test_splits_never_exceed_the_tiles_a_row_can_have() -> None:
    assert plan_splits(1, KV_HEADS, 100, 64, SMS) == SplitPlan(2)  # 100 keys: 2 tiles of 64
    assert plan_splits(1, KV_HEADS, MAX_TOKENS, 64, SMS, window=64) == SplitPlan(1)
    assert plan_splits(2, KV_HEADS, MAX_TOKENS, 64, SMS) == SplitPlan(33)  # 4 x 132 / 16


def test_a_decode_tiling_is_spelled_and_parsed_by_its_letters() -> None:
    assert DecodeConfig(128, 4, 5).name == "n128w4s5"
    assert DecodeConfig.parse("n32w2s3") == DecodeConfig(32, 2, 3)
    with pytest.raises(ValueError, match="not a DecodeConfig"):
        DecodeConfig.parse("m64n128k128w4s4")
