"""How many requests of an offline run are let into the router at once.

The offline run ends with its longest request, after as many steps as that request's tokens.
A step costs at least one read of the weights however few rows it has, so the cheapest run
spreads the other requests' tokens over those steps instead of running them all at the start
and leaving the longest requests to decode alone at the end, in small weight-bound steps.
`submitted_at_pace` submits the requests in the order given (longest first) while fewer than
`PACE_FACTOR` x (tokens left to generate) / (steps the longest request still needs) are
unfinished, and looks again each time one finishes; the router's `max_num_seqs` and token
budget still bound the batch. Tokens left are estimated from each request's `max_new_tokens`
(an upper bound: a request ending at EOS frees its slot, and the estimate follows).

On the 8B shape's 1,000 ShareGPT-shaped requests the floor of the schedule (per-step cost model
of benchmarks/offline_floor.py, H100 ceilings, TGI's join rule at the LLM's defaults) falls from
12.85 s with up to 512 let in at once to 11.51 s at this pace (benchmarks/schedule_sim.py).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from shardline.router.batcher import Batcher
    from shardline.router.request_stream import RequestStream
    from shardline.router.request_types import ValidRequest

T = TypeVar("T")

PACE_FACTOR = 1.5  # the schedule simulation's best of 0.8 to 2.0


def pace_limit(tokens_left: int, longest_chain: int, factor: float | None = None) -> int:
    """How many requests may be unfinished at once: enough rows per step to generate every
    token left within the steps the longest request still needs, times `factor` (PACE_FACTOR
    as it is at the call: the benchmarks set it)."""
    factor = PACE_FACTOR if factor is None else factor
    return max(1, math.ceil(factor * tokens_left / max(longest_chain, 1)))


def _left(stream: RequestStream) -> tuple[int, int]:
    """(tokens, steps) an unfinished request may still generate."""
    width = len(stream.entry.sequences)
    generated = stream.entry.generated_tokens
    most = stream.request.max_new_tokens
    return width * most - generated, most - generated // width


async def submitted_at_pace(
    batcher: Batcher,
    requests: list[ValidRequest],
    consume: Callable[[int, RequestStream], Awaitable[T]],
) -> list[T]:
    """`consume(i, stream)` of every request, submitted in the order given at the pace above;
    the results in that order. The first error cancels the requests still running."""
    waiting = deque(range(len(requests)))
    waiting_tokens = sum(_width(r) * r.max_new_tokens for r in requests)
    running: dict[asyncio.Future[T], tuple[int, RequestStream]] = {}
    results: list[T] = [None] * len(requests)  # type: ignore[list-item]
    try:
        while waiting or running:
            # Submitting moves a request's tokens from waiting to running, and (longest first)
            # never lengthens the chain: the limit changes only as tokens are generated.
            limit = _limit(running, waiting_tokens, requests, waiting) if waiting else 0
            while waiting and len(running) < limit:
                index = waiting.popleft()
                waiting_tokens -= _width(requests[index]) * requests[index].max_new_tokens
                stream = batcher.submit(requests[index])
                running[asyncio.ensure_future(consume(index, stream))] = (index, stream)
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index, _ = running.pop(task)
                results[index] = task.result()
    finally:
        for task in running:
            task.cancel()
    return results


def _limit(
    running: dict[asyncio.Future, tuple[int, RequestStream]],
    waiting_tokens: int,
    requests: list[ValidRequest],
    waiting: deque[int],
) -> int:
    left = [_left(stream) for _, stream in running.values()]
    tokens = waiting_tokens + sum(tokens for tokens, _ in left)
    chain = max([steps for _, steps in left] + [requests[waiting[0]].max_new_tokens])
    return pace_limit(tokens, chain)


def _width(request: ValidRequest) -> int:
    return request.params.num_sequences
