"""The baseline the offline figure is compared with: transformers' `generate` on padded static
batches of the workload."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from benchmarks.timed_requests import random_prompt


def hf_baseline(model_dir: Path, pairs: list[tuple[int, int]], batch: int, vocab: int) -> dict:
    """transformers' generate on padded static batches; step time measured, workload modeled."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    rng = random.Random(2)
    sample = pairs[:batch]
    width = max(n for n, _ in sample)
    ids = torch.tensor([[0] * (width - n) + random_prompt(n, rng, vocab) for n, _ in sample]).cuda()
    mask = (
        torch.arange(width).cuda()[None, :]
        >= (width - torch.tensor([n for n, _ in sample]).cuda())[:, None]
    ).long()
    steps = 32

    def run(new_tokens: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        return time.perf_counter() - started

    run(2)
    prefill = run(1)
    step = (run(steps + 1) - prefill) / steps
    total_time = 0.0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        total_time += prefill + step * max(n for _, n in chunk)
    useful = sum(n for _, n in pairs)
    result = {
        "mode": f"hf_batch{batch}",
        "step_ms": 1e3 * step,
        "prefill_ms": 1e3 * prefill,
        "output_tok_s": useful / total_time,
    }
    print(json.dumps(result), flush=True)
    return result
