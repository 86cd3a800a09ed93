"""The offline run's schedule on the per-call floor cost model (benchmarks/offline_floor.py),
without a GPU: how long the router's admission would take at best in arrival order, longest
first, and longest first at the `paced` policy's pace (router/paced_admission.py), for several `max_num_seqs`.

    python -m benchmarks.schedule_sim --workload .wheels/sharegpt-shaped-1000.jsonl --shape 8b [--fp8]

A step takes up to `--prefill-budget` prompt tokens of the requests waiting (a prompt that does
not fit is chunked) beside every running request's decode row when TGI's join rule lets them
join (`--waiting-served-ratio`, `--max-waiting-tokens`), while the running requests and their
whole answers fit `--kv-tokens`; its cost is `Call.floor_s` at the given ceilings (an
H100's measured ones by default). Every request generates exactly its output length.
"""

from __future__ import annotations

import argparse
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from benchmarks.offline_floor import Call, Ceilings, ModelShape, causal_pairs
from benchmarks.random_model import SHAPES, config_for
from benchmarks.timed_requests import load_workload
from shardline.router.paced_admission import pace_limit


@dataclass
class Running:
    prompt: int
    output: int
    generated: int = 1  # the first token comes with the prompt's last chunk


@dataclass(frozen=True)
class Schedule:
    seconds: float
    steps: int
    tail_steps: int  # decode steps of fewer than 32 rows


def simulate(
    pairs: list[tuple[int, int]], max_seqs: int, paced: bool, args: argparse.Namespace
) -> Schedule:
    shape = ModelShape.from_config(config_for(args.shape))
    ceilings = Ceilings(args.matmul_flops, args.bytes_s)
    if args.fp8:  # FP8 projections and cache, the LM head 16-bit (the engine's default)
        shape = shape.stored_as(1, 2, 1)
        ceilings = Ceilings(args.matmul_flops, args.bytes_s, args.fp8_matmul_flops)
    held = deque([prompt, output, 0] for prompt, output in pairs)  # not submitted yet
    queue: deque = deque()  # submitted, waiting in the router
    running: list[Running] = []
    seconds, steps, tail, waited = 0.0, 0, 0, 0
    while held or queue or running:
        limit = _paced_limit(held, queue, running) if paced else len(pairs)
        while held and len(running) + len(queue) < limit:
            queue.append(held.popleft())
        joining, prompt_tokens, pairs_computed = [], 0, 0
        if _joins(queue, running, waited, args):
            joining, prompt_tokens, pairs_computed = _admit(queue, running, max_seqs, args)
        waited = 0 if prompt_tokens else waited + 1
        rows = len(running)
        context = sum(r.prompt + r.generated for r in running)
        call = Call("step", rows, prompt_tokens, context, pairs_computed, 0.0)
        seconds += call.floor_s(shape, ceilings)
        steps += 1
        tail += not prompt_tokens and rows < 32
        for r in running:
            r.generated += 1
        running = [r for r in running + joining if r.generated < r.output]
    return Schedule(seconds, steps, tail)


def _joins(queue: deque, running: list[Running], waited: int, args: argparse.Namespace) -> bool:
    """TGI's join rule (router/join_policy.py): enough wait, or they waited long enough; a
    prompt under way always goes on."""
    if not queue:
        return False
    if not running or queue[0][2] or waited >= args.max_waiting_tokens:
        return True
    return len(queue) >= int(len(running) * args.waiting_served_ratio)


def _admit(
    waiting: deque, running: list[Running], limit: int, args: argparse.Namespace
) -> tuple[list[Running], int, int]:
    used = sum(r.prompt + r.output for r in running)
    budget, prompt_tokens, pairs_computed, joining = args.prefill_budget, 0, 0, []
    while waiting and len(running) + len(joining) < limit and budget > 0:
        head = waiting[0]
        if used + head[0] + head[1] > args.kv_tokens:
            break
        chunk = min(budget, head[0] - head[2])
        pairs_computed += causal_pairs(head[2], chunk)
        prompt_tokens += chunk
        budget -= chunk
        head[2] += chunk
        if head[2] < head[0]:
            break
        waiting.popleft()
        joining.append(Running(head[0], head[1]))
        used += head[0] + head[1]
    return joining, prompt_tokens, pairs_computed


def _paced_limit(held: deque, queue: deque, running: list[Running]) -> int:
    waiting = [*queue, *list(held)[:1]]
    tokens = sum(r.output - r.generated for r in running) + sum(w[1] for w in (*queue, *held))
    chain = max([r.output - r.generated for r in running] + [w[1] for w in waiting] + [1])
    return pace_limit(tokens, chain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--max-num-seqs", default="192,256,384,512,1024")
    parser.add_argument("--prefill-budget", type=int, default=8256)
    parser.add_argument("--kv-tokens", type=int, default=419_000, help="the 8B's on one H100")
    parser.add_argument("--waiting-served-ratio", type=float, default=0.3)
    parser.add_argument("--max-waiting-tokens", type=int, default=20)
    parser.add_argument("--matmul-flops", type=float, default=803e12)
    parser.add_argument("--bytes-s", type=float, default=3.0e12)
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="FP8 weights and KV cache (--quantize fp8 --kv-cache-dtype fp8_e4m3fn); give the "
        "--kv-tokens their memory holds",
    )
    parser.add_argument("--fp8-matmul-flops", type=float, default=1.4e15)
    args = parser.parse_args()
    pairs = load_workload(args.workload, None)
    output = sum(n for _, n in pairs)
    longest = sorted(pairs, key=lambda pair: -pair[1])
    for name, order, paced in (
        ("arrival", pairs, False),
        ("longest", longest, False),
        ("paced", longest, True),
    ):
        for max_seqs in (int(n) for n in args.max_num_seqs.split(",")):
            run = simulate(order, max_seqs, paced, args)
            print(
                f"{name:8s} max_num_seqs {max_seqs:5d}: {run.seconds:6.2f} s  "
                f"{output / run.seconds:6.0f} output tok/s  {run.steps} steps, "
                f"{run.tail_steps} of < 32 rows",
                flush=True,
            )


if __name__ == "__main__":
    main()
