"""N concurrent streams against a running server; prints throughput and latency percentiles.

    python benchmarks/http_load.py --url http://127.0.0.1:8080 --concurrency 32 --requests 256

Definitions are vLLM's: TTFT is the time to the first token event; TPOT is a request's
(latency - TTFT) / (output tokens - 1); ITL is every gap between consecutive token events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

_WORDS = [
    "the",
    "model",
    "server",
    "batch",
    "cache",
    "token",
    "stream",
    "river",
    "city",
    "north",
    "south",
    "paris",
]


@dataclass
class Result:
    ok: bool
    latency: float = 0.0
    ttft: float = 0.0
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict) -> Result:
    started = time.perf_counter()
    times: list[float] = []
    try:
        async with session.post(f"{url}/generate_stream", json=body) as response:
            if response.status != 200:
                return Result(ok=False, error=f"{response.status}: {await response.text()}")
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[len(b"data:") :])
                if "error" in event:
                    return Result(ok=False, error=event["error"])
                times.append(time.perf_counter())
    except aiohttp.ClientError as error:
        return Result(ok=False, error=str(error))
    if not times:
        return Result(ok=False, error="no token received")
    return Result(
        ok=True,
        latency=times[-1] - started,
        ttft=times[0] - started,
        token_times=times,
        output_tokens=len(times),
    )


async def run(args: argparse.Namespace) -> tuple[list[Result], float]:
    rng = random.Random(args.seed)
    bodies = [
        {
            "inputs": make_prompt(rng, rng.randint(args.min_prompt_words, args.max_prompt_words)),
            "parameters": {"max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos},
        }
        for _ in range(args.requests)
    ]
    semaphore = asyncio.Semaphore(args.concurrency)
    timeout = aiohttp.ClientTimeout(total=None)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def bounded(body: dict) -> Result:
            async with semaphore:
                return await one_stream(session, args.url, body)

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(body) for body in bodies))
        return results, time.perf_counter() - started


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000

    mean = statistics.fmean(ordered) * 1000
    return f"mean {mean:8.2f}  p50 {pick(0.5):8.2f}  p90 {pick(0.9):8.2f}  p99 {pick(0.99):8.2f} ms"


def report(results: list[Result], elapsed: float) -> None:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    print(f"requests        {len(done)} ok, {len(failed)} failed in {elapsed:.2f} s")
    print(f"throughput      {len(done) / elapsed:.2f} req/s, {tokens / elapsed:.1f} output tok/s")
    print(f"TTFT            {percentiles([r.ttft for r in done])}")
    print(f"TPOT            {percentiles(tpot)}")
    print(f"ITL             {percentiles(itl)}")
    print(f"latency         {percentiles([r.latency for r in done])}")
    for error in sorted({r.error for r in failed})[:5]:
        print(f"error: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--min-prompt-words", type=int, default=16)
    parser.add_argument("--max-prompt-words", type=int, default=256)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report(*asyncio.run(run(args)))


if __name__ == "__main__":
    main()
