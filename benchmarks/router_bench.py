"""The router's own cost per streamed token, without a GPU: the real router app (validation,
queue, batcher, detokenization, SSE) over the tests' fake shard, in its own process on
the router's event loop, with every request streamed at once from this process.

Prints the streamed tokens/s and the router process's CPU microseconds per token (user + system,
from /proc): that CPU time bounds how fast the served mode can go whatever the GPU does, and it
is spent on the router's one event loop while the shards compute the next step.

    python -m benchmarks.router_bench [--streams 512] [--new-tokens 200] [--rounds 3] [--step-ms 15]
        [--trace]   # every request traced, its spans sent to a stand-in OTLP collector
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from aiohttp import web
from shardline_client import AsyncClient
from shardline_client.loadgen import GenerateStreamOptions, LoadRequest, run_load

from benchmarks.serve_bench import wait_healthy
from benchmarks.served_costs import cpu_seconds
from shardline.event_loop import run_event_loop
from shardline.gc_pauses import freeze_long_lived_objects
from shardline.router import tracing
from shardline.router.server import create_app
from shardline.router.startup import RouterSettings, start_router

CONTINUATION = " the model server streams every token of this text back"


async def _serve_router(
    port: int, tokenizer_dir: Path, step_s: float, otlp_endpoint: str | None
) -> None:
    from tests.fake_shard import FakeShardClient, tiny_tokenizer

    tokenizer = tiny_tokenizer(tokenizer_dir)
    ids = tokenizer(CONTINUATION, add_special_tokens=False)["input_ids"]
    fake = FakeShardClient(
        lambda prompt: (ids * 1000)[:4096],
        tokenizer.eos_token_id,
        step_delay=step_s,
        max_supported_total_tokens=10_000_000,
    )
    settings = RouterSettings(
        model_id="fake",
        max_input_tokens=512,
        max_total_tokens=4096,
        max_batch_prefill_tokens=8192,
        max_batch_size=512,
        max_concurrent_requests=8192,
    )
    ctx = await start_router(fake, tokenizer, settings)
    tracing.configure(otlp_endpoint)
    freeze_long_lived_objects()  # as the router CLI does
    runner = web.AppRunner(create_app(ctx), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _round(url: str, pid: int, streams: int, new_tokens: int) -> dict:
    options = GenerateStreamOptions(max_new_tokens=new_tokens)
    requests = [LoadRequest("the model server", options) for _ in range(streams)]
    cpu_before = cpu_seconds(pid)
    async with AsyncClient(url, timeout=600, max_retries=0) as client:
        report = await run_load(client, requests, streams, None, 0, ignore_eos=True)
    cpu = cpu_seconds(pid) - cpu_before
    summary = report.summary()
    tokens = summary["output_tokens"]
    return {
        "streams": streams,
        "errors": summary["errors"],
        "output_tok_s": round(summary["output_tokens_per_s"]),
        "tpot_p50_ms": round(summary["tpot_p50_ms"], 2),
        "router_cpu_us_per_token": round(1e6 * cpu / max(tokens, 1), 1),
    }


async def _measure(
    port: int, process: subprocess.Popen, streams: int, new_tokens: int, rounds: int
) -> list[dict]:
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url, process, timeout=120)
    results = []
    for _ in range(rounds):
        results.append(await _round(url, process.pid, streams, new_tokens))
        print(json.dumps(results[-1]), flush=True)
    return results


def bench(
    streams: int, new_tokens: int, rounds: int, port: int, step_ms: float, trace: bool = False
) -> list[dict]:
    """Starts the router process on `port`, streams `rounds` times, stops it. With `trace`,
    every request's spans go to a stand-in collector in this process."""
    command = [sys.executable, "-m", "benchmarks.router_bench", "--serve", f"--port={port}"]
    command.append(f"--step-ms={step_ms}")
    with _collector(trace) as collector:
        if collector is not None:
            command.append(f"--otlp-endpoint={collector.endpoint}")
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            results = asyncio.run(_measure(port, process, streams, new_tokens, rounds))
        finally:
            process.terminate()
            process.wait(timeout=30)
    for result in results:
        result["spans_exported"] = len(collector.spans) if collector is not None else 0
    return results


def _collector(trace: bool) -> contextlib.AbstractContextManager:
    """A stand-in OTLP collector when tracing (the GPU image has no opentelemetry), else none."""
    if not trace:
        return contextlib.nullcontext()
    from tests.otlp_collector import running_collector

    return running_collector()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument(
        "--step-ms",
        type=float,
        default=15.0,
        help="the fake shard's time per step (an H100's 8B step at ~450 rows); 0 streams as "
        "fast as the router can, which leaves the load generator behind: writes back up and "
        "the router's CPU per token doubles",
    )
    parser.add_argument("--trace", action="store_true", help="trace every request (OTLP)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--otlp-endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        with tempfile.TemporaryDirectory() as folder:
            serving = _serve_router(args.port, Path(folder), args.step_ms / 1e3, args.otlp_endpoint)
            run_event_loop(serving)
        return
    rounds = bench(args.streams, args.new_tokens, args.rounds, args.port, args.step_ms, args.trace)
    cost = statistics.median(r["router_cpu_us_per_token"] for r in rounds)
    rate = statistics.median(r["output_tok_s"] for r in rounds)
    print(f"== router over a fake shard at {args.step_ms} ms a step, {args.streams} streams ==")
    print(f"streamed tok/s (median of {len(rounds)})        {rate:>8}")
    print(f"router CPU us per token (median)      {cost:>8}")
    print(f"router-bound step at {args.streams} rows, ms      {cost * args.streams / 1e3:>8.1f}")


if __name__ == "__main__":
    main()
