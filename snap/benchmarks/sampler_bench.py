"""The sampler's cost per decode step on the GPU: `Sampler()(logits, state)` then
`state.append(next_ids)`, as the model runner calls them, for several batch compositions.

Each case is timed two ways, median over the timed steps, after warm-up: eager (CUDA events
around each step, so launch gaps count when the GPU waits on Python) and replayed from one CUDA
graph (the GPU time alone). The logits rotate among three float32 buffers of random values.

    python benchmarks/sampler_bench.py [--batches 1 64 256] [--vocabs 49152 128000] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

from shardline.proto import generate_pb2 as pb
from shardline.shards.utils.sampling import Sampler, SamplingState

PROMPT_LEN = 200
PENALTIES = {"repetition_penalty": 1.2, "frequency_penalty": 0.1, "presence_penalty": 0.2}


def _greedy(row: int) -> pb.NextTokenChooserParameters:
    return pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0)


def _sampled(row: int) -> pb.NextTokenChooserParameters:
    """The seed document's preset."""
    return pb.NextTokenChooserParameters(
        do_sample=True, temperature=0.8, top_p=0.95, top_k=50, typical_p=1.0, seed=row
    )


def _penalized(row: int) -> pb.NextTokenChooserParameters:
    return _with_penalties(_sampled(row))


def _with_penalties(params: pb.NextTokenChooserParameters) -> pb.NextTokenChooserParameters:
    for name, value in PENALTIES.items():
        setattr(params, name, value)
    return params


def _mixed(row: int) -> pb.NextTokenChooserParameters:
    """A quarter each: greedy, greedy with penalties, sampled, sampled with penalties."""
    kinds = (_greedy, lambda r: _with_penalties(_greedy(r)), _sampled, _penalized)
    return kinds[row % 4](row)


SCENARIOS: dict[str, Callable[[int], pb.NextTokenChooserParameters]] = {
    "greedy": _greedy,
    "sampled": _sampled,
    "sampled+penalties": _penalized,
    "mixed": _mixed,
    "top_p-only(sort)": lambda row: pb.NextTokenChooserParameters(
        do_sample=True, temperature=0.8, top_p=0.95, typical_p=1.0, seed=row
    ),
}


def _state(scenario: str, batch: int, vocab: int, device: torch.device) -> SamplingState:
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=generator).tolist()
    return SamplingState.from_requests(
        [SCENARIOS[scenario](row) for row in range(batch)],
        [pb.StoppingCriteriaParameters(max_new_tokens=1024, ignore_eos_token=True)] * batch,
        prompts,
        [0],
        [0] * batch,
        vocab,
        device,
    )


def _time_eager(step: Callable[[int], None], steps: int) -> float:
    events = []
    for i in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1000


def _time_graph(step: Callable[[int], None], steps: int) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(0)
    timings = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        timings.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in timings) * 1000


def measure(scenario: str, batch: int, vocab: int, steps: int) -> dict[str, float | int | str]:
    device = torch.device("cuda")
    state = _state(scenario, batch, vocab, device)
    logits = [torch.randn(batch, vocab, device=device) * 3 for _ in range(3)]
    sampler = Sampler()

    def step(i: int) -> None:
        state.append(sampler(logits[i % 3], state).next_token_ids)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) on a side stream, as graphs want
        for i in range(5):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    eager = _time_eager(step, steps)
    graph = _time_graph(step, steps)
    return {
        "scenario": scenario,
        "batch": batch,
        "vocab": vocab,
        "eager_us": eager,
        "graph_us": graph,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49_152, 128_000])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'case':<18} {'batch':>5} {'vocab':>7} {'eager us':>10} {'graph us':>10}")
    results = []
    for scenario in SCENARIOS:
        for vocab in args.vocabs:
            for batch in args.batches:
                row = measure(scenario, batch, vocab, args.steps)
                results.append(row)
                print(
                    f"{scenario:<18} {batch:>5} {vocab:>7} "
                    f"{row['eager_us']:>10.1f} {row['graph_us']:>10.1f}",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
