"""The packaged SmolLM2-135M on a fixed English passage (tests/data/fp8_passage.txt, 287 tokens):
its perplexity with FP8 weights, and with an FP8 KV cache, within 3 % of bfloat16's.

Measured on CPU: bfloat16 20.37, float32 20.34; FP8 weights 20.97 (+2.95 %: a 135M model is
among the most sensitive to weight rounding); FP8 KV cache e4m3fn 20.31, e5m2 20.42. With the
LM head quantized too (SHARDLINE_FP8_LM_HEAD=1) 21.19 against the FP8 weights' 20.97 (+1.1 %;
in bfloat16 21.11 against 21.03, +0.4 %). The prompt is prefilled in chunks of 128 tokens, so the later chunks
attend to the FP8 cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from shardline import LLM, SamplingParams
from shardline.shards.utils.quantization import FP8_LM_HEAD_VARIABLE

PASSAGE = (Path(__file__).parent / "data" / "fp8_passage.txt").read_text()
OPTIONS = dict(
    block_size=16, kv_cache_bytes=64 << 20, max_model_len=512, max_num_batched_tokens=128
)
TOLERANCE = 0.03


def perplexity(**settings: str | float) -> float:
    llm = LLM(**OPTIONS, **settings)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    output = llm.generate([PASSAGE], params, use_tqdm=False)[0]
    llm.shutdown()
    scored = zip(output.prompt_logprobs[1:], output.prompt_token_ids[1:], strict=True)
    logprobs = [entry[token].logprob for entry, token in scored]
    return math.exp(-sum(logprobs) / len(logprobs))


@pytest.fixture(scope="module")
def bfloat16_perplexity() -> float:
    return perplexity(dtype="bfloat16")


@pytest.mark.parametrize(
    "settings",
    [{"quantization": "fp8"}, {"kv_cache_dtype": "fp8_e4m3fn"}, {"kv_cache_dtype": "fp8_e5m2"}],
    ids=["fp8-weights", "fp8_e4m3fn-kv", "fp8_e5m2-kv"],
)
def test_fp8_keeps_the_perplexity_within_3_percent(bfloat16_perplexity, settings) -> None:
    assert 10 < bfloat16_perplexity < 40  # the model reads English
    assert abs(perplexity(**settings) / bfloat16_perplexity - 1) < TOLERANCE


def test_an_fp8_lm_head_keeps_the_perplexity_within_2_percent_of_fp8_weights(monkeypatch) -> None:
    weights_only = perplexity(quantization="fp8")
    monkeypatch.setenv(FP8_LM_HEAD_VARIABLE, "1")
    assert abs(perplexity(quantization="fp8") / weights_only - 1) < 0.02
