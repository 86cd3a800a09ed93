"""What `Batcher.submit` hands back: one request's events, in the order the batcher sends them."""

from __future__ import annotations

from shardline.router.queue import Entry
from shardline.router.request_types import StreamEvent, ValidRequest


class RequestStream:
    """The events of one request, in order; the last one carries `finished`.

    Iterating raises the request's error (a `RouterError`) if generation failed. `cancel()`
    (e.g. when the client disconnects) drops the request from its batch after the current step.
    """

    def __init__(self, entry: Entry) -> None:
        self._entry = entry
        self._ended = False
        self._unfinished = len(entry.sequences)

    @property
    def request(self) -> ValidRequest:
        return self._entry.request

    @property
    def entry(self) -> Entry:
        """The request's place in the router: its sequences and what they generated so far."""
        return self._entry

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._ended:
            raise StopAsyncIteration
        item = await self._entry.events.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item.finished is not None:
            self._unfinished -= 1
        self._ended = self._unfinished == 0
        return item

    async def collect(self) -> list[StreamEvent]:
        """The events not read yet, once the last is in (its error raised, if it failed)."""
        if self._ended:
            return []
        items = await self._entry.events.rest()
        self._ended = True
        events = []
        for item in items:
            if isinstance(item, BaseException):
                raise item
            events.append(item)
        return events

    def cancel(self) -> None:
        if self._entry.alive:
            self._entry.cancelled = True
