"""Requests timed through a batcher over an in-process engine (the offline `LLM`'s shards):
each token's arrival, the run's latency summary, and where its wall time went by shard call.
The engine benchmarks' runs are built on it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import statistics
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from benchmarks.offline_floor import Call, StepLog
from benchmarks.workload import load_workload as load_workload  # its importers' old home
from shardline import LLM, SamplingParams
from shardline.router.batcher import Batcher, BatchingConfig
from shardline.router.event_channel import EventOrError
from shardline.router.metrics import RouterMetrics
from shardline.router.paced_admission import SchedulingPolicy
from shardline.router.request_stream import RequestStream
from shardline.router.request_types import StreamEvent, ValidRequest

if TYPE_CHECKING:
    from shardline.shards.engine import ShardEngine


LONGEST_REQUESTS = 10  # run_edges' "longest requests"


@dataclass
class RequestTiming:
    start: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


def random_prompt(length: int, rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(3, min(vocab, 100_000)) for _ in range(length)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


async def timed_run(
    llm: LLM,
    requests: list[ValidRequest],
    config: BatchingConfig | None = None,
    delays: list[float] | None = None,
    policy: SchedulingPolicy = "fcfs",
) -> tuple[float, list[RequestTiming], list[Call]]:
    """Every request through a batcher (the LLM's own config unless `config`, under the
    scheduling `policy`: `paced` is `LLM.generate`'s), request i submitted `delays[i]` seconds
    after the start (default: all at once, in order); the engine's calls (none where the shard
    runs in its own process)."""
    metrics = RouterMetrics()
    waste: list[float] = []
    engine = getattr(llm._shards, "engine", None)  # None: the shard runs in its own process
    steps = StepLog.attach(engine) if engine is not None else None
    delays = delays or [0.0] * len(requests)
    config = dataclasses.replace(config or llm._batching_config(), scheduling_policy=policy)
    async with llm._shards.client() as client:
        batcher = Batcher(client, llm.tokenizer, config, metrics)
        batcher.start()
        sampler = asyncio.create_task(_sample_kv_waste(engine, waste)) if engine else None
        try:
            started = time.perf_counter()
            consumers = (_consume(batcher, r, d) for r, d in zip(requests, delays, strict=True))
            timings = await asyncio.gather(*consumers)
            elapsed = time.perf_counter() - started
        finally:
            if sampler is not None:
                sampler.cancel()
            await batcher.stop()
    if len(requests) > 1:
        breakdown = shard_call_breakdown(metrics, elapsed)
        breakdown["kv_waste_mean"] = round(statistics.fmean(waste), 4) if waste else None
        print(json.dumps(breakdown), flush=True)
    if steps is None:
        return elapsed, list(timings), []
    if len(requests) > 1:
        print(json.dumps({"steps_by_decode_rows": steps.summary()}), flush=True)
    steps.detach()
    return elapsed, list(timings), steps.calls


async def _sample_kv_waste(
    engine: ShardEngine, samples: list[float], every_s: float = 0.25
) -> None:
    """KV-cache waste while requests run: slots allocated to sequences but holding no token,
    over the slots allocated (a paged cache wastes only the tail of each last block)."""
    block_size = engine.settings.block_size
    while True:
        await asyncio.sleep(every_s)
        sequences = [seq for batch in list(engine.batches.values()) for seq in batch.sequences]
        allocated = block_size * sum(len(seq.blocks) for seq in sequences)
        if allocated:
            samples.append(1 - sum(seq.num_cached for seq in sequences) / allocated)


def shard_call_breakdown(metrics: RouterMetrics, elapsed: float) -> dict:
    """Where a run's wall time went, by shard call: count, seconds in total and per call."""
    sample = metrics.registry.get_sample_value
    out: dict = {"wall_s": round(elapsed, 2)}
    for method in ("prefill", "decode"):
        labels = {"method": method}
        count = sample("tgi_batch_inference_duration_count", labels) or 0
        seconds = sample("tgi_batch_inference_duration_sum", labels) or 0.0
        out[method] = {
            "calls": int(count),
            "seconds": round(seconds, 2),
            "ms_per_call": round(1e3 * seconds / max(count, 1), 2),
        }
    sizes = ("tgi_batch_next_size_sum", "tgi_batch_next_size_count")
    out["mean_prefill_batch"] = round((sample(sizes[0]) or 0) / max(sample(sizes[1]) or 0, 1), 1)
    return out


async def _consume(batcher: Batcher, request: ValidRequest, delay: float = 0.0) -> RequestTiming:
    if delay:
        await asyncio.sleep(delay)
    return await _timed(batcher.submit(request), time.perf_counter())


def _timed(stream: RequestStream, start: float) -> Awaitable[RequestTiming]:
    """The request's token times, stamped as the batcher hands over each step's events, read
    the way `LLM.generate` reads a request (one wake-up, at its end): a reader woken at every
    token would add a task switch per row and step to the host's work the run measures."""
    timing = RequestTiming(start=start)
    channel = stream.entry.events
    put = channel.put

    def stamped(items: Iterable[EventOrError], final: bool = False) -> None:
        items = list(items)
        now = time.perf_counter()
        timing.token_times.extend(now for item in items if isinstance(item, StreamEvent))
        put(items, final)

    channel.put = stamped  # type: ignore[method-assign]

    async def collected() -> RequestTiming:
        await stream.collect()
        return timing

    return collected()


def make_requests(
    llm: LLM, pairs: list[tuple[int, int]], vocab: int, seed: int = 0
) -> list[ValidRequest]:
    """Random prompts (the same for the same seed: a prefix cache would hit them again)."""
    rng = random.Random(seed)
    return [
        llm._valid_request(None, random_prompt(n_in, rng, vocab), exact_length(n_out))
        for n_in, n_out in pairs
    ]


def run_edges(first_tokens: list[float], last_tokens: list[float], outputs: list[int]) -> dict:
    """When the run's first token came, when its longest requests' first tokens came (the longest
    request's chain of steps sets the run's end once it starts) and when the last token came;
    seconds from the run's start, each request's in `outputs`' order."""
    longest = sorted(range(len(outputs)), key=outputs.__getitem__)[-LONGEST_REQUESTS:]
    return {
        "first_token_s": round(min(first_tokens), 3),
        "longest_first_token_s": round(statistics.mean(first_tokens[i] for i in longest), 3),
        "longest_last_token_s": round(max(last_tokens[i] for i in longest), 3),
        "last_token_s": round(max(last_tokens), 3),
    }


def exact_length(n_out: int) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=n_out, min_tokens=n_out)


def summarize(name: str, elapsed: float, timings: list[RequestTiming], prompt_tokens: int) -> dict:
    out_tokens = sum(len(t.token_times) for t in timings)
    itl = [x for t in timings for x in t.itl]
    tpot = [t.tpot for t in timings if t.tpot is not None]
    ttft = [t.ttft for t in timings]
    result = {
        "mode": name,
        "requests": len(timings),
        "seconds": elapsed,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + prompt_tokens) / elapsed,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "tpot_p50_ms": 1e3 * percentile(tpot, 50),
        "tpot_p99_ms": 1e3 * percentile(tpot, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50),
        "itl_p99_ms": 1e3 * percentile(itl, 99),
    }
    print(json.dumps(result), flush=True)
    return result
