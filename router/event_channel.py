"""One request's events, from the batcher to the request's one reader.

What an asyncio.Queue did here, at less cost per event: a step's events go in at once (one
wake-up of the reader per step, not per token), and a reader that wants only the whole list
(`RequestStream.collect`: the offline `LLM`, non-streaming routes) is woken once, when the
final item arrives, instead of at every step.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from shardline.router.request_types import StreamEvent

EventOrError = StreamEvent | BaseException


class EventChannel:
    def __init__(self) -> None:
        self._items: deque[EventOrError] = deque()
        self._final = False
        self._waiter: asyncio.Future[None] | None = None
        self._whole = False  # the waiting reader wants the final item, not the next one

    def empty(self) -> bool:
        return not self._items

    def put(self, items: Iterable[EventOrError], final: bool = False) -> None:
        """`final`: nothing follows these items (the request ended or failed)."""
        self._items.extend(items)
        self._final = self._final or final
        waiter = self._waiter
        if waiter is not None and (self._final or not self._whole) and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> EventOrError:
        while not self._items:
            await self._wait(whole=False)
        return self._items.popleft()

    async def rest(self) -> list[EventOrError]:
        """Every item not read yet, once the final one is in."""
        while not self._final:
            await self._wait(whole=True)
        items = list(self._items)
        self._items.clear()
        return items

    async def _wait(self, whole: bool) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        self._whole = whole
        try:
            await self._waiter
        finally:
            self._waiter = None
