"""On a CUDA device: GPT-2, BLOOM and Falcon's layouts through the engine's GPU path (Triton
kernels, ALiBi included, CUDA graphs, the overlapped schedule) give transformers' float32 greedy
tokens (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.model_factory import LAYER_NORM_ARCHITECTURES, TinyModelSpec, build_tiny_model
from tests.shard_harness import random_prompts
from tests.test_gpu_engine import _engine_tokens, _hf_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-families")
    spec = dict(
        hidden_size=512,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=1024,
        initializer_range=0.25,
    )
    return {
        arch: build_tiny_model(root / arch, TinyModelSpec(architecture=arch, seed=i, **spec))
        for i, arch in enumerate(LAYER_NORM_ARCHITECTURES)
    }


@pytest.mark.parametrize("attention", ["triton", "torch"])
@pytest.mark.parametrize("arch", LAYER_NORM_ARCHITECTURES)
def test_float32_gpu_tokens_equal_transformers(family_dirs, arch: str, attention: str) -> None:
    prompts = random_prompts(12, 384, seed=31, max_len=300)
    max_new = [32] * len(prompts)
    expected = _hf_tokens(family_dirs[arch], torch.float32, prompts, max_new)
    tokens = _engine_tokens(family_dirs[arch], "float32", attention, prompts, max_new, True)
    assert tokens == expected
