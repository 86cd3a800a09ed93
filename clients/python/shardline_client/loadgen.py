"""Streaming load generator: N concurrent `generate_stream` calls, timed token by token.

`run_load` is the library entry point (benchmark scripts call it); `shardline-loadgen` is the
command. Metrics use vLLM's definitions: TTFT is the time to the first token, TPOT a request's
mean time per output token after the first, ITL every gap between two consecutive tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from typing_extensions import Unpack

from .async_client import AsyncClient
from .types import GenerateStreamOptions

PERCENTILES = (50, 90, 99)


@dataclass
class StreamTiming:
    """When each token of one stream arrived, in seconds after its request was sent."""

    token_times: list[float] = field(default_factory=list)
    sent_at: float = 0.0  # seconds after the run started (a burst's requests go out over time)

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def latency(self) -> float:
        return self.token_times[-1]

    @property
    def tpot(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.latency - self.ttft) / (len(self.token_times) - 1)

    @property
    def itls(self) -> list[float]:
        return [later - earlier for earlier, later in pairwise(self.token_times)]


@dataclass
class LoadReport:
    timings: list[StreamTiming]
    errors: list[str]
    wall_s: float

    def summary(self) -> dict[str, float]:
        """Counts, throughput, and p50/p90/p99 of TTFT, TPOT, ITL and latency in ms."""
        tokens = sum(len(timing.token_times) for timing in self.timings)
        summary = {
            "requests": len(self.timings),
            "errors": len(self.errors),
            "wall_s": self.wall_s,
            "requests_per_s": len(self.timings) / self.wall_s,
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / self.wall_s,
        }
        series = {
            "ttft": [timing.ttft for timing in self.timings],
            "tpot": [timing.tpot for timing in self.timings if timing.tpot is not None],
            "itl": [gap for timing in self.timings for gap in timing.itls],
            "latency": [timing.latency for timing in self.timings],
        }
        for name, values in series.items():
            for pct, value in zip(PERCENTILES, _percentiles(values), strict=True):
                summary[f"{name}_p{pct}_ms"] = value * 1000
        return summary


@dataclass
class LoadRequest:
    """One prompt with its own `generate_stream` options (over those shared by the run)."""

    prompt: str
    options: GenerateStreamOptions = field(default_factory=GenerateStreamOptions)


def _percentiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0] if values else float("nan")] * len(PERCENTILES)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return [cuts[pct - 1] for pct in PERCENTILES]


async def _timed_stream(
    client: AsyncClient, prompt: str, options: GenerateStreamOptions, run_start: float
) -> StreamTiming:
    start = time.perf_counter()
    timing = StreamTiming(sent_at=start - run_start)
    async for _ in client.generate_stream(prompt, **options):
        timing.token_times.append(time.perf_counter() - start)
    if not timing.token_times:
        raise RuntimeError("the stream ended without a token")
    return timing


async def run_load(
    client: AsyncClient,
    prompts: Sequence[str | LoadRequest],
    concurrency: int,
    request_rate: float | None = None,
    seed: int | None = None,
    **options: Unpack[GenerateStreamOptions],
) -> LoadReport:
    """Streams every prompt, at most `concurrency` at once, and times each token.

    `request_rate` (requests/s) spaces the sends as a Poisson process drawn from `seed`; None
    sends all at once. A failed request is counted in `errors` and does not stop the others.
    """
    slots = asyncio.Semaphore(concurrency)
    arrivals = random.Random(seed)

    async def one(request: str | LoadRequest) -> StreamTiming:
        if isinstance(request, str):
            request = LoadRequest(request)
        async with slots:
            options_here = {**options, **request.options}
            return await _timed_stream(client, request.prompt, options_here, start)

    start = time.perf_counter()
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(one(prompt)))
        # All at once, each request still goes out as it is made: yielding lets the loop carry
        # the ones made so far onward (connect, send), where a burst of 1,000 made in one go
        # sent none until every connection was opened (the first reached the server ~0.5 s in).
        await asyncio.sleep(arrivals.expovariate(request_rate) if request_rate else 0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    wall_s = time.perf_counter() - start
    timings = [result for result in results if isinstance(result, StreamTiming)]
    errors = [repr(result) for result in results if isinstance(result, BaseException)]
    return LoadReport(timings, errors, wall_s)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8080")
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--request-rate", type=float, default=None, help="requests/s, Poisson")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max tokens")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser.parse_args(argv)


def print_report(report: LoadReport, as_json: bool = False) -> None:
    """Prints each distinct error, then the summary as a table or as JSON."""
    for error in sorted(set(report.errors)):
        print(f"error: {error}")
    summary = report.summary()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for name, value in summary.items():
        print(f"{name:>24}  {value:,.2f}")


async def _main(args: argparse.Namespace) -> LoadReport:
    async with AsyncClient(args.url, timeout=args.timeout, api_key=args.api_key) as client:
        return await run_load(
            client,
            [args.prompt] * args.num_requests,
            args.concurrency,
            args.request_rate,
            max_new_tokens=args.max_new_tokens,
            ignore_eos=args.ignore_eos or None,
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    print_report(asyncio.run(_main(args)), args.json)
