"""Pipeline parallelism on several GPUs: offline throughput of TP x PP with P batches in flight
(the router's lanes, router/batch_lane.py) against fewer, on one loaded model.

    python -m benchmarks.random_model --shape 8b --out /tmp/m8 --tokenizer-wheel WHEEL
    python -m benchmarks.pipeline_bench --model-dir /tmp/m8 --tp 1 --pp 2 --batches-in-flight 1,2

Prints one JSON line per run: output tokens/s, decode steps, the steps sent while another was
in flight (`shardline_batch_steps_overlapped`; 0 with one batch) and wall ms per decode step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

from shardline import LLM, SamplingParams
from shardline.router.batcher import BatchingConfig


class LanesLLM(LLM):
    """The offline LLM with the batches in flight set here (None: the pipeline's stages)."""

    batches_in_flight: int | None = None

    def _batching_config(self) -> BatchingConfig:
        config = super()._batching_config()
        if self.batches_in_flight is None:
            return config
        return dataclasses.replace(config, batches_in_flight=self.batches_in_flight)


def run(llm: LanesLLM, prompts: list[list[int]], output_len: int, lanes: int) -> dict:
    llm.batches_in_flight = lanes
    metrics = llm.metrics
    steps_before = metrics.batch_inference_count.value(method="decode")
    overlapped_before = metrics.batch_steps_overlapped.value()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    wall = time.perf_counter() - started
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    steps = metrics.batch_inference_count.value(method="decode") - steps_before
    return {
        "batches_in_flight": lanes,
        "requests": len(prompts),
        "output_tok_s": round(tokens / wall, 1),
        "decode_steps": int(steps),
        "steps_overlapped": int(metrics.batch_steps_overlapped.value() - overlapped_before),
        "ms_per_decode_step": round(1000 * wall / max(steps, 1), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--batches-in-flight", default="1,2", help="comma-separated runs")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=128, help="rows of each batch")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    llm = LanesLLM(
        model=str(args.model_dir),
        tensor_parallel_size=args.tp,
        pipeline_parallel_size=args.pp,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.input_len + args.output_len + 16,
    )
    try:
        vocab = min(llm.vocab_size, len(llm.tokenizer))
        rng = random.Random(0)
        prompts = [
            [rng.randrange(3, vocab) for _ in range(args.input_len)]
            for _ in range(args.num_requests)
        ]
        run(llm, prompts[: args.max_num_seqs], 8, 1)  # warm the host paths and the allocator
        for lanes in (int(n) for n in args.batches_in_flight.split(",")):
            print(json.dumps(run(llm, prompts, args.output_len, lanes)), flush=True)
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
