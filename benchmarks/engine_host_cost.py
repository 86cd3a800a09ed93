"""The engine thread's host work per call, outside the model's own compute: what a GPU run pays
between one pass and the next while the device may wait (session 26's meter: 0.26-0.44 s of an
FP8 offline run's device idle sat before its passes). A tiny Llama runs through `LLM.generate`;
CPU thread time is taken around the engine's calls and subtracted around the model runner's
prefill pass (prefill) or the model's forward (decode), so what remains is the engine's Python:
scheduling chunks, sequences, block tables, sampling rows (decode: CPU sampling included, which
a GPU runs as kernels).

    python -m benchmarks.engine_host_cost --phase prefill [--prompts 1200] [--passes 3]
    python -m benchmarks.engine_host_cost --phase decode [--prompts 300] [--passes 3]

prefill: prompts of 100-300 tokens and 2 new tokens each, ~8k prompt tokens a pass; decode:
prompts of 4-29 tokens whose `max_tokens` are drawn from 8-119, so that rows end on most steps
(each end filters the batch). Prints one line a pass; noisy on a shared machine: compare runs of
one tree with another's in one sitting.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shardline import LLM, SamplingParams
from tests.model_factory import TinyModelSpec, build_tiny_model


class ThreadClock:
    """CPU seconds the calling thread spends inside wrapped callables, and how many calls."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def wrap(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - started
                self.calls += 1

        return timed


def workload(phase: str, count: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(0)
    if phase == "prefill":
        prompts = [
            [rng.randrange(3, 380) for _ in range(rng.randrange(100, 300))] for _ in range(count)
        ]
        return prompts, [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)] * count
    prompts = [[rng.randrange(3, 380) for _ in range(rng.randrange(4, 30))] for _ in range(count)]
    params = [
        SamplingParams(temperature=0, max_tokens=rng.randrange(8, 120), ignore_eos=True)
        for _ in prompts
    ]
    return prompts, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=("prefill", "decode"), required=True)
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    count = args.prompts or (1200 if args.phase == "prefill" else 300)
    spec = TinyModelSpec(
        hidden_size=64, num_layers=1, num_heads=8, num_kv_heads=4, intermediate_size=32
    )
    with tempfile.TemporaryDirectory() as folder:
        llm = LLM(
            model=str(build_tiny_model(Path(folder), spec)),
            block_size=16,
            kv_cache_bytes=512 << 20,
            max_model_len=512,
            max_num_seqs=512,
            max_num_batched_tokens=8192,  # the offline benchmark's prefill budget
        )
        engine = llm._shards.engine
        calls, inner = ThreadClock(), ThreadClock()
        if args.phase == "prefill":
            engine.prefill_step = calls.wrap(engine.prefill_step)
            engine.runner.prefill = inner.wrap(engine.runner.prefill)
        else:
            engine.decode_step = calls.wrap(engine.decode_step)
            engine.model.forward = inner.wrap(engine.model.forward)
        prompts, params = workload(args.phase, count)
        for _ in range(args.passes):
            calls.seconds = calls.calls = inner.seconds = inner.calls = 0
            llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            outside_ms = 1e3 * (calls.seconds - inner.seconds) / max(calls.calls, 1)
            print(
                f"{args.phase} calls {calls.calls}: engine host {outside_ms:.3f} ms a call "
                f"outside the {'runner pass' if args.phase == 'prefill' else 'model forward'}",
                flush=True,
            )
        llm.shutdown()


if __name__ == "__main__":
    main()
