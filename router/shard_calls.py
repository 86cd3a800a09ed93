"""The batcher's calls to the shards: a step's Prefill or Decode runs in a task of its own while
the router handles the step before; each is timed and counted in TGI's metrics, and the oldest
one in flight tells /health how long the shards have been busy. A failed step fails its
requests alone; the housekeeping calls (clear, filter, drop) log their failures. Past a
deadline (`ShardTimeoutError`) every call raises: the batcher gives up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from shardline.proto import generate_pb2 as pb
from shardline.router.client import ShardClient, ShardTimeoutError, StepResult
from shardline.router.entry_outcomes import fail
from shardline.router.errors import GenerationError
from shardline.router.metrics import RouterMetrics
from shardline.router.queue import Entry

logger = logging.getLogger(__name__)

# Event loop turns a started shard call needs before its request is written: the gRPC client
# sends from a task of its own, which must run before the router's work on the last step.
_YIELDS_TO_SEND = 2


@dataclass
class InFlight:
    """A shard call on its way; its task answers the result and the seconds it took."""

    method: str
    task: asyncio.Future[tuple[StepResult, float]]
    batch_ids: list[int]


class ShardCalls:
    def __init__(self, client: ShardClient, metrics: RouterMetrics) -> None:
        self._client = client
        self._metrics = metrics
        # Steps in flight, each with the time.monotonic() it was sent at.
        self._in_flight: dict[asyncio.Future[tuple[StepResult, float]], float] = {}

    @property
    def oldest_s(self) -> float:
        """Seconds the oldest Prefill or Decode in flight has run so far (0 when none)."""
        if not self._in_flight:
            return 0.0
        return time.monotonic() - min(self._in_flight.values())

    async def send(
        self, method: str, call: Coroutine[Any, Any, StepResult], batch_ids: list[int]
    ) -> InFlight:
        """Starts a step and returns once its request is on its way."""
        self._metrics.batch_inference_count.inc(method=method)
        if self._in_flight:  # another batch's step (pipeline parallelism)
            self._metrics.batch_steps_overlapped.inc()
        task = asyncio.ensure_future(_timed(call))
        self._in_flight[task] = time.monotonic()
        for _ in range(_YIELDS_TO_SEND):
            await asyncio.sleep(0)
        return InFlight(method, task, batch_ids)

    async def receive(self, call: InFlight, entries: list[Entry]) -> StepResult | None:
        """The step's answer; on failure every entry of its batches gets a 424 error and its
        batches are cleared (past its deadline, the error goes up: the loop gives up)."""
        try:
            result, seconds = await call.task
        except Exception as error:
            self._metrics.batch_inference_failure.inc(method=call.method)
            if isinstance(error, ShardTimeoutError):
                raise
            logger.error("%s failed: %s", call.method, error, extra={"batch_ids": call.batch_ids})
            fail(entries, GenerationError(_describe(error)))
            for batch_id in call.batch_ids:
                await self.clear_cache(batch_id)
            return None
        finally:
            self._in_flight.pop(call.task, None)
        metrics = self._metrics
        metrics.batch_inference_success.inc(method=call.method)
        metrics.batch_inference_duration.labels(call.method).observe(seconds)
        metrics.batch_forward_duration.labels(call.method).observe(result.timings.forward_ns / 1e9)
        metrics.batch_decode_duration.labels(call.method).observe(result.timings.decode_ns / 1e9)
        return result

    async def abandon(self) -> None:
        """Cancels every step in flight."""
        calls, self._in_flight = self._in_flight, {}
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    async def filter_batch(
        self, batch_id: int, keep: Sequence[int], stopped: Sequence[pb.SequenceRef]
    ) -> pb.CachedBatch | None:
        """The cached batch with only the `keep` requests, less the `stopped` samples; None
        when nothing is left."""
        started = time.monotonic()
        filtered = await self._client.filter_batch(batch_id, keep, stopped)
        self._metrics.batch_filter_duration.labels("filter").observe(time.monotonic() - started)
        return filtered if filtered is not None and filtered.size else None

    async def drop_prefills(self, entries: list[Entry]) -> None:
        """Frees what the shards hold of these partly prefilled prompts."""
        if not entries:
            return
        for entry in entries:
            entry.prefilled = 0  # the shards hold none of it now
        try:
            await self._client.drop_prefills([entry.id for entry in entries])
        except ShardTimeoutError:
            raise
        except Exception as error:
            logger.error("dropping partial prompts failed: %s", error)

    async def clear_cache(self, batch_id: int | None) -> None:
        try:
            await self._client.clear_cache(batch_id)
        except ShardTimeoutError:
            raise
        except Exception as error:
            logger.error("clear_cache failed: %s", error, extra={"batch_id": batch_id})


async def _timed(call: Coroutine[Any, Any, StepResult]) -> tuple[StepResult, float]:
    started = time.monotonic()
    result = await call
    return result, time.monotonic() - started


def _describe(error: BaseException) -> str:
    details = getattr(error, "details", None)
    return str(details() if callable(details) else error) or type(error).__name__
