"""On several CUDA devices: pipeline stages over NCCL (activations by send/recv, the last stage's
choices sent back to the earlier stages, which answer a Decode before they come; three rows a
batch, so two batches are in flight) give the single GPU's float32 greedy tokens (skipped with
fewer GPUs)."""

from __future__ import annotations

import pytest
import torch

from tests.shard_harness import llm_greedy, random_prompts, transformers_greedy

pytestmark = [pytest.mark.gpu]


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2)])
def test_pipeline_over_nccl_equals_transformers(tiny_llama_dir, tp: int, pp: int) -> None:
    if _gpus() < tp * pp:
        pytest.skip(f"needs {tp * pp} CUDA devices")
    prompts = random_prompts(6, 384, seed=51, min_len=10)
    lengths = [8, 4, 6, 8, 5, 7]
    expected = transformers_greedy(tiny_llama_dir, prompts, lengths)
    pipelined = llm_greedy(
        tiny_llama_dir,
        prompts,
        lengths,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        dtype="float32",
        block_size=16,
        gpu_memory_utilization=0.3,
        max_model_len=256,
        max_num_seqs=3,
        max_num_batched_tokens=16,
    )
    assert pipelined == expected
