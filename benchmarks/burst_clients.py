"""An all-at-once run sent from several client processes, as a burst from many clients arrives.

One Python process takes ~1.2 s to put 1,000 streams on the wire (session 28: the served run's
whole gap to the offline one was that start); N processes each send every N-th request, all
starting at one wall-clock instant, and their timings come back in the requests' order with
`sent_at` counted from that instant.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

from shardline_client import AsyncClient
from shardline_client.loadgen import LoadReport, LoadRequest, StreamTiming, run_load

START_DELAY_S = 2.0  # time for every process to start and import before the common start


def _send_share(
    url: str, requests: list[LoadRequest], start_at: float, timeout: float, options: dict
) -> LoadReport:
    """One process's share, begun at the wall-clock `start_at` (its `sent_at`s counted from it)."""

    async def send() -> LoadReport:
        await asyncio.sleep(max(start_at - time.time(), 0.0))
        async with AsyncClient(url, timeout=timeout, max_retries=0) as client:
            return await run_load(client, requests, len(requests), None, None, **options)

    began = time.time()
    report = asyncio.run(send())
    late = max(began - start_at, 0.0)  # a process that started after the common instant
    for timing in report.timings:
        timing.sent_at += late
    return report


def run_burst(
    url: str, requests: list[LoadRequest], processes: int, timeout: float, **options
) -> LoadReport:
    """Every request at once from `processes` client processes (request i from process i % N).
    Without errors the timings are in the requests' order (a failed request drops its own)."""
    shares = [requests[index::processes] for index in range(processes)]
    start_at = time.time() + START_DELAY_S
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [
            pool.submit(_send_share, url, share, start_at, timeout, options) for share in shares
        ]
        reports = [future.result() for future in futures]
    errors = [error for report in reports for error in report.errors]
    if errors:
        timings = [timing for report in reports for timing in report.timings]
    else:
        timings = [StreamTiming()] * len(requests)
        for index, report in enumerate(reports):
            timings[index::processes] = report.timings
    wall_s = max((timing.sent_at + timing.latency for timing in timings), default=0.0)
    return LoadReport(timings, errors, wall_s)
