"""A request's event channel: items in order, a streaming reader woken per step, a collecting
reader only by the final item."""

from __future__ import annotations

import asyncio

import pytest

from shardline.router.event_channel import EventChannel
from shardline.router.request_types import StreamEvent, Token


def _event(index: int) -> StreamEvent:
    return StreamEvent(index=index, token=Token(id=index, text=str(index), logprob=None))


async def _turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_streaming_reader_gets_each_step_in_order() -> None:
    channel = EventChannel()
    reader = asyncio.create_task(channel.get())
    await _turns()
    assert not reader.done()
    channel.put([_event(0), _event(1)])
    assert (await reader).index == 0
    assert (await channel.get()).index == 1
    assert channel.empty()


async def test_a_collecting_reader_wakes_only_at_the_final_item() -> None:
    channel = EventChannel()
    collector = asyncio.create_task(channel.rest())
    channel.put([_event(0)])
    await _turns()
    assert not collector.done()
    error = RuntimeError("failed")
    channel.put([_event(1)])
    channel.put([error], final=True)
    items = await collector
    assert [item.index for item in items[:2]] == [0, 1] and items[2] is error
    assert channel.empty()


async def test_a_cancelled_reader_leaves_the_items() -> None:
    channel = EventChannel()
    reader = asyncio.create_task(channel.rest())
    await _turns()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    channel.put([_event(0)], final=True)
    assert [item.index for item in await channel.rest()] == [0]
