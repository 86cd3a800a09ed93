"""The host's cost of one offline decode step: a tiny Llama (hidden 256, so that on a GPU its
forward costs almost nothing) generating for many rows through `LLM.generate`; what each step
takes is then the router's and the shard's Python work per step.

    python -m benchmarks.host_step_cost [--rows 256] [--tokens 48] [--passes 5] [--label NAME]
        [--hidden 256] [--layers 2]

Prints one line per pass: wall ms per step, the process's CPU seconds, and `host_us` (per row
and step: the process's CPU less the model forward's, timed on the engine thread between
forward hooks; on CPU the forward is the torch reference attention's loop over rows, which a
GPU does not run, and it is what dominates `cpu_s`), split into `router_us` (the main thread's:
the router and `LLM.generate`) and `engine_us` (the rest: the engine thread's, sampling on the
CPU included, which a GPU runs as kernels). To compare two
source trees, install each with `pip install --no-deps --target DIR` and run this file with
`PYTHONPATH=DIR` from a folder that holds `benchmarks/` and `tests/` but no `shardline/` (e.g.
links to a snapshot's): from the repo root, the working tree's `shardline/` comes first on the
path and, through an editable install, its `router/` and `shards/` too, so every "tree" runs the
working tree's code (check `shardline.router.batcher.__file__`).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from shardline import LLM, SamplingParams
from tests.model_factory import TinyModelSpec, build_tiny_model


class ForwardClock:
    """CPU seconds the calling thread spends inside a module's forward (hooks around it)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._started = 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, *_: object) -> None:
        self._started = time.thread_time()

    def _stop(self, *_: object) -> None:
        self.seconds += time.thread_time() - self._started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--label", default="tree")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    spec = TinyModelSpec(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=args.hidden // 2,
    )
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_model(Path(folder), spec)
        llm = LLM(
            model=str(model),
            block_size=16,
            kv_cache_bytes=256 << 20,
            max_model_len=256,
            max_num_seqs=args.rows,
        )
        rng = random.Random(0)
        prompts = [
            [rng.randrange(3, 380) for _ in range(rng.randrange(4, 30))] for _ in range(args.rows)
        ]
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        llm.generate(prompt_token_ids=prompts[:8], sampling_params=params, use_tqdm=False)
        forward = ForwardClock(llm._shards.engine.model)
        row_steps = args.rows * args.tokens
        for _ in range(args.passes):
            cpu, wall, in_forward = time.process_time(), time.perf_counter(), forward.seconds
            router = time.thread_time()
            llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            router_us = 1e6 * (time.thread_time() - router) / row_steps
            step_ms = 1e3 * (time.perf_counter() - wall) / args.tokens
            cpu_s = time.process_time() - cpu
            host_us = 1e6 * (cpu_s - forward.seconds + in_forward) / row_steps
            print(
                f"{args.label} wall_ms_per_step {step_ms:.3f} cpu_s {cpu_s:.3f} "
                f"host_us {host_us:.2f} router_us {router_us:.2f} "
                f"engine_us {host_us - router_us:.2f}",
                flush=True,
            )
        llm.shutdown()


if __name__ == "__main__":
    main()
