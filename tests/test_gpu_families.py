"""On a CUDA device: Qwen3, Gemma 2, Gemma 3 and Phi-3 through the engine's GPU path (Triton
attention with soft-capping and sliding windows, CUDA graphs, the launch-ahead overlap) give
transformers' float32 greedy tokens (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.model_factory import DECODER_FAMILY_ARCHITECTURES, TinyModelSpec, build_tiny_model
from tests.shard_harness import random_prompts
from tests.test_gpu_engine import _engine_tokens, _hf_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Phi-3's tiny checkpoint switches to its long rope factors past 48 positions, where
# transformers' generate re-prefills the sequence: prompts and answers stay below.
MAX_PROMPT = 24
MAX_NEW = 20


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("arch", DECODER_FAMILY_ARCHITECTURES)
def test_float32_gpu_tokens_equal_transformers(tmp_path: Path, arch: str, overlap: bool):
    spec = TinyModelSpec(
        architecture=arch, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, seed=31
    )
    model_dir = build_tiny_model(tmp_path / arch, spec)
    prompts = random_prompts(12, 384, seed=32, max_len=MAX_PROMPT)
    max_new = [MAX_NEW] * len(prompts)
    expected = _hf_tokens(model_dir, torch.float32, prompts, max_new)
    tokens = _engine_tokens(
        model_dir, "float32", "triton", prompts, max_new, overlap, max_input_tokens=128
    )
    assert tokens == expected
