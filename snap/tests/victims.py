"""Victim streams: honest /generate_stream requests that run beside a hostile one and must all
finish untouched. Shared by the isolation tests (hostile bodies, poison requests).

    async with victim_streams(client) as victims:
        ...  # send the hostile request; victims are mid-generation here
    # on exit: every victim streamed all its tokens and finished with `length`
    assert victims.finished == victims.count
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp.test_utils import TestClient

VICTIM_TOKENS = 24
FINISH_TIMEOUT_S = 60.0


def victim_body(index: int, max_new_tokens: int = VICTIM_TOKENS) -> dict:
    return {
        "inputs": f"victim {index} tells a long story",
        "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True, "details": True},
    }


@dataclass
class Victims:
    count: int
    max_new_tokens: int
    started: list[asyncio.Event] = field(default_factory=list)
    finished: int = 0


async def _stream(client: TestClient, index: int, victims: Victims) -> None:
    """One victim: every event is a token, the last one finishes with `length` after exactly
    `max_new_tokens` tokens; an error event or a short stream fails the test."""
    answer = await client.post("/generate_stream", json=victim_body(index, victims.max_new_tokens))
    assert answer.status == 200, (index, await answer.text())
    events = []
    async for line in answer.content:
        if not line.startswith(b"data:"):
            continue
        event = json.loads(line[len(b"data:") :])
        assert "error" not in event, (index, event)
        events.append(event)
        victims.started[index].set()
    assert len(events) == victims.max_new_tokens, (index, len(events))
    assert events[-1]["details"]["finish_reason"] == "length", (index, events[-1])
    victims.finished += 1


async def _until_started(victims: Victims, tasks: list[asyncio.Task[None]]) -> None:
    """Until every victim has its first token; a victim that fails first raises its error."""
    waiter = asyncio.ensure_future(asyncio.gather(*(event.wait() for event in victims.started)))
    pending: set[asyncio.Future] = {waiter, *tasks}
    while not waiter.done():
        done, pending = await asyncio.wait(
            pending, timeout=FINISH_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            waiter.cancel()
            raise TimeoutError("the victim streams did not start")
        for task in done - {waiter}:
            task.result()


@contextlib.asynccontextmanager
async def victim_streams(
    client: TestClient, count: int = 4, max_new_tokens: int = VICTIM_TOKENS
) -> AsyncIterator[Victims]:
    """Starts `count` victim streams and waits for each one's first token (all are
    mid-generation) before the block runs; on exit, waits for them and checks each finished
    whole (`AssertionError` otherwise)."""
    victims = Victims(count, max_new_tokens, [asyncio.Event() for _ in range(count)])
    tasks = [asyncio.create_task(_stream(client, index, victims)) for index in range(count)]
    try:
        await _until_started(victims, tasks)
        yield victims
        await asyncio.wait_for(asyncio.gather(*tasks), FINISH_TIMEOUT_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert victims.finished == count
