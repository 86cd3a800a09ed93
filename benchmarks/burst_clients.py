"""An all-at-once run sent from several client processes, as a burst from many clients arrives.

One Python process takes ~1.2 s to put 1,000 streams on the wire (session 28: the served run's
whole gap to the offline one was that start); N processes each send every N-th request, all
starting together once every one is ready, and their timings come back in the requests' order
with `sent_at` counted from the first one's start.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from shardline_client import AsyncClient
from shardline_client.loadgen import LoadReport, LoadRequest, StreamTiming, run_load

BARRIER_TIMEOUT_S = 120.0  # for every process to start and import
_start_together: Any = None  # each process's copy of the run's barrier


def _join(barrier: Any) -> None:
    global _start_together
    _start_together = barrier


def _send_share(
    url: str, requests: list[LoadRequest], timeout: float, options: dict
) -> tuple[float, LoadReport]:
    """One process's share, sent once every process is ready: the wall-clock time it began at,
    and its report."""

    async def send() -> LoadReport:
        async with AsyncClient(url, timeout=timeout, max_retries=0) as client:
            return await run_load(client, requests, len(requests), None, None, **options)

    _start_together.wait(BARRIER_TIMEOUT_S)
    return time.time(), asyncio.run(send())


def run_burst(
    url: str, requests: list[LoadRequest], processes: int, timeout: float, **options
) -> LoadReport:
    """Every request at once from `processes` client processes (request i from process i % N),
    counted from the first process's start. Without errors the timings are in the requests'
    order (a failed request drops its own)."""
    shares = [requests[index::processes] for index in range(processes)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    with ProcessPoolExecutor(processes, context, _join, (barrier,)) as pool:
        futures = [pool.submit(_send_share, url, share, timeout, options) for share in shares]
        answers = [future.result() for future in futures]
    run_start = min(began for began, _ in answers)
    for began, report in answers:
        for timing in report.timings:
            timing.sent_at += began - run_start
    reports = [report for _, report in answers]
    errors = [error for report in reports for error in report.errors]
    if errors:
        timings = [timing for report in reports for timing in report.timings]
    else:
        timings = [StreamTiming()] * len(requests)
        for index, report in enumerate(reports):
            timings[index::processes] = report.timings
    wall_s = max((timing.sent_at + timing.latency for timing in timings), default=0.0)
    return LoadReport(timings, errors, wall_s)
