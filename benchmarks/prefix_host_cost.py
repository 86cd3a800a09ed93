"""What prefix caching costs the host at a 0 % hit rate (issue 21's "unshared" bar), on the CPU:

1. `lifecycle`: each request's prefix-cache work on the shard, alone, at the workload's sizes:
   its prompt looked up and allocated, its full prompt blocks indexed after the prefill, a block
   allocated per 16 generated tokens, its prompt and generated tokens indexed and its blocks
   freed when it ends (256 requests alive at once, 24k blocks: the index fills and evicts, as
   on the H100). Prints us per request with caching on and off.
2. `run`: the workload through the real batcher and engine (as `prefix_bench.py`'s unshared
   workload) on a tiny Llama, so that the host's work is what is timed: on and off alternated
   (on off, off on, ...; after a short run of each), each from an empty index. Prints each
   run's schedule (calls, decode rows, prompt tokens, and whether every call was the same as
   in the first run), its wall and CPU seconds, the host's CPU (the process's less the model
   forward's), the garbage collector's time, and the time inside each prefix function (timed
   by wrappers, ~0.35 us each; per request; next_batch includes the view's three).

    python -m benchmarks.prefix_host_cost --workload .wheels/sharegpt-shaped-1000.jsonl \
        [--part lifecycle|run|both] [--rounds 2] [--num-requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import random
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path

from benchmarks.host_step_cost import ForwardClock
from benchmarks.prefix_bench import at_once, mode_orders
from benchmarks.timed_requests import load_workload, random_prompt
from shardline import LLM
from shardline.proto import generate_pb2 as pb
from shardline.router import prefix_view, queue
from shardline.shards import batch, prefix_cache, prompt_chunks
from shardline.shards.batch import SequenceState
from shardline.shards.kv_cache import BlockAllocator
from shardline.shards.sequences import forking
from tests.model_factory import TinyModelSpec, build_tiny_model

BLOCK, LIVE, BLOCKS, VOCAB = 16, 256, 24_000, 384


def lifecycle(pairs: list[tuple[int, int]], caching: bool) -> float:
    """Microseconds of prefix-cache and allocator work per request, on the shard."""
    allocator = prefix_cache.new_allocator(BLOCKS, BLOCK, caching)
    rng = random.Random(5)
    requests = [
        pb.Request(id=i, input_ids=random_prompt(n_in, rng, VOCAB))
        for i, (n_in, _) in enumerate(pairs)
    ]
    replies = [random_prompt(n_out, rng, VOCAB) for _, n_out in pairs]
    live: deque[tuple[SequenceState, list[int]]] = deque()
    started = time.perf_counter_ns()
    for request, reply in zip(requests, replies, strict=True):
        if len(live) == LIVE:
            _finish(allocator, *live.popleft())
        found = prefix_cache.reuse_cached_prefix(allocator, request) or []
        blocks = found + allocator.allocate(
            allocator.blocks_for(len(request.input_ids)) - len(found)
        )
        seq = SequenceState.for_prompt(request, blocks, ())
        prefix_cache.remember_prompt(allocator, seq, len(request.input_ids))
        live.append((seq, reply))
    while live:
        _finish(allocator, *live.popleft())
    return (time.perf_counter_ns() - started) / 1e3 / len(requests)


def _finish(allocator: BlockAllocator, seq: SequenceState, reply: list[int]) -> None:
    """The sequence generates `reply` (a block whenever one fills) and ends."""
    for token in reply:
        if seq.num_cached // BLOCK >= len(seq.blocks):
            seq.blocks += allocator.allocate(1)
        seq.record(token)
    batch.remember_sequence(allocator, seq)
    allocator.free(seq.blocks)


class PrefixTimers:
    """Nanoseconds and calls inside the prefix-caching functions, by name (wrappers)."""

    def __init__(self) -> None:
        self.totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        view = prefix_view.PrefixCacheView
        for owner, name in [
            (prompt_chunks, "reuse_cached_prefix"),
            (prompt_chunks, "remember_prompt"),
            (batch, "remember_sequence"),
            (forking, "remember_sequence"),
            (BlockAllocator, "allocate"),  # PrefixCachingAllocator's include these
            (BlockAllocator, "free"),
            (prefix_cache.PrefixCachingAllocator, "allocate"),
            (prefix_cache.PrefixCachingAllocator, "free"),
            (view, "expect"),  # these three inside next_batch
            (view, "waits_for"),
            (view, "computed"),
            (view, "answered"),
        ]:
            label = f"{getattr(owner, '__qualname__', owner.__name__.rsplit('.')[-1])}.{name}"
            setattr(owner, name, self._timed(getattr(owner, name), label))
        next_batch = queue.RequestQueue.next_batch  # on and off
        label = "RequestQueue.next_batch"
        queue.RequestQueue.next_batch = self._timed(next_batch, label)

    def _timed(self, function: Callable, name: str) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            started = time.perf_counter_ns()
            try:
                return function(*args, **kwargs)
            finally:
                entry = self.totals[name]
                entry[0] += time.perf_counter_ns() - started
                entry[1] += 1

        return timed

    def report(self, requests: int) -> str:
        parts = [
            f"{name} {ns / 1e3 / requests:.1f}us/req ({calls})"
            for name, (ns, calls) in sorted(self.totals.items())
            if calls
        ]
        self.totals.clear()
        return "  " + "\n  ".join(parts)


class GcClock:
    """Seconds inside the garbage collector and collections by generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0
        gc.callbacks.append(self._phase)

    def _phase(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def report(self) -> str:
        line = f"gc {self.seconds:.3f} s, collections by generation {self.collections}"
        self.seconds, self.collections = 0.0, [0, 0, 0]
        return line


def run(args: argparse.Namespace, pairs: list[tuple[int, int]]) -> None:
    rng = random.Random(4)
    prompts = [random_prompt(n_in, rng, VOCAB) for n_in, _ in pairs]
    outs = [n_out for _, n_out in pairs]
    timers, collector = PrefixTimers(), GcClock()
    with tempfile.TemporaryDirectory() as folder:
        spec = TinyModelSpec(
            hidden_size=64, num_layers=1, intermediate_size=64, max_position_embeddings=4096
        )
        model = build_tiny_model(Path(folder), spec)
        llms = {mode: _load(model, mode == "on") for mode in ("on", "off")}
        for llm in llms.values():  # what a process's first run pays once (imports, caches)
            asyncio.run(at_once(llm, prompts[:64], outs[:64]))
        clocks = {mode: ForwardClock(llm._shards.engine.model) for mode, llm in llms.items()}
        timers.report(len(pairs))
        collector.report()
        first: dict[str, int] = {}
        for order in mode_orders(args.rounds):
            for mode in order:
                llm, clock = llms[mode], clocks[mode]
                cpu, forward = time.process_time(), clock.seconds
                result = asyncio.run(at_once(llm, prompts, outs))
                cpu, forward = time.process_time() - cpu, clock.seconds - forward
                steps = result["steps"]
                same = first.setdefault("crc", steps["schedule_crc"]) == steps["schedule_crc"]
                print(
                    f"run {mode}: wall {result['seconds']:.2f} s, cpu {cpu:.2f} s, forward "
                    f"{forward:.2f} s, host {cpu - forward:.2f} s; calls (prefill, decode) "
                    f"{steps['calls']} rows {steps['decode_rows']} prompt {steps['prompt_tokens']} "
                    "schedule "
                    f"{'the same as the first run' if same else 'DIFFERENT'}; hit rate "
                    f"{result['hit_rate']:.3f}; {collector.report()}\n"
                    f"{timers.report(len(pairs))}",
                    flush=True,
                )
        for llm in llms.values():
            llm.shutdown()


def _load(model: Path, caching: bool) -> LLM:
    """prefix_bench's settings; a KV cache of ~24k blocks, about the 8B's on one H100."""
    return LLM(
        model=str(model),
        dtype="float32",
        max_model_len=4096,
        enable_chunked_prefill=True,
        max_num_batched_tokens=8192,
        max_num_seqs=LIVE,
        enable_prefix_caching=caching,
        kv_cache_bytes=96 << 20,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--part", choices=["lifecycle", "run", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=2, help="of the run, on/off alternated")
    args = parser.parse_args()
    pairs = load_workload(args.workload, args.num_requests)
    if args.part != "run":
        for round_ in range(3):
            on, off = lifecycle(pairs, True), lifecycle(pairs, False)
            print(
                f"lifecycle {round_}: on {on:.1f} us/req, off {off:.1f} us/req, "
                f"caching costs {on - off:.1f} us/req",
                flush=True,
            )
    if args.part != "lifecycle":
        run(args, pairs)


if __name__ == "__main__":
    main()
