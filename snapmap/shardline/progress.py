"""Progress of long work (weight loading, graph capture) as log lines a supervisor can relay.

A terminal progress bar rewrites one line with carriage returns, which a launcher reading its
children's output line by line cannot show; this logs `what: done/total` at most every few
seconds and once at the end, with the elapsed time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def logged_progress(
    items: Iterable[T], total: int, what: str, logger: logging.Logger, every_s: float = 2.0
) -> Iterator[T]:
    started = last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if done == total or now - last >= every_s:
            last = now
            logger.info(
                "%s: %d/%d", what, done, total, extra={"elapsed_s": round(now - started, 1)}
            )
