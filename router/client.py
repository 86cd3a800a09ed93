"""The router's view of the shards: a `ShardClient` protocol and its gRPC implementation.

Every call goes to every shard at once and the shards run in lockstep; shard 0's answer is
the one used (TGI's sharded client).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from shardline.proto import CALL_SEQUENCE_KEY, generate_pb2_grpc
from shardline.proto import generate_pb2 as pb

T = TypeVar("T")

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


@dataclass(frozen=True)
class Timings:
    """Seconds spent on the shard; `concat` only for decode."""

    forward: float
    decode: float
    total: float
    concat: float = 0.0


@dataclass(frozen=True)
class StepResult:
    generations: list[pb.Generation]
    batch: pb.CachedBatch | None
    timings: Timings


class ShardClient(Protocol):
    async def info(self) -> pb.InfoResponse: ...

    async def health(self) -> None: ...

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse: ...

    async def prefill(self, batch: pb.Batch) -> StepResult: ...

    async def decode(self, batches: Sequence[pb.CachedBatch]) -> StepResult: ...

    async def filter_batch(
        self,
        batch_id: int,
        request_ids: Sequence[int],
        stopped_sequences: Sequence[pb.SequenceRef] = (),
    ) -> pb.CachedBatch | None: ...

    async def clear_cache(self, batch_id: int | None = None) -> None: ...

    async def stats(self) -> pb.StatsResponse: ...


def step_result(answer: pb.PrefillResponse | pb.DecodeResponse) -> StepResult:
    """A Prefill or Decode answer as the batcher reads it."""
    timings = Timings(
        forward=answer.forward_ns / 1e9,
        decode=answer.decode_ns / 1e9,
        total=answer.total_ns / 1e9,
        concat=getattr(answer, "concat_ns", 0) / 1e9,
    )
    batch = answer.batch if answer.HasField("batch") else None
    return StepResult(list(answer.generations), batch, timings)


def filter_request(
    batch_id: int, request_ids: Sequence[int], stopped_sequences: Sequence[pb.SequenceRef] = ()
) -> pb.FilterBatchRequest:
    return pb.FilterBatchRequest(
        batch_id=batch_id, request_ids=list(request_ids), stopped_sequences=list(stopped_sequences)
    )


def clear_cache_request(batch_id: int | None) -> pb.ClearCacheRequest:
    """For one batch, or (None) for all of them."""
    return pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(id=batch_id)


class ShardedClient:
    """gRPC to every shard over unix sockets (`unix://PATH`)."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("at least one shard url is needed")
        self._channels = [grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS) for url in urls]
        self._stubs = [generate_pb2_grpc.TextGenerationServiceStub(ch) for ch in self._channels]
        self._sequence = itertools.count()

    @classmethod
    async def connect(cls, master_uds_path: str) -> ShardedClient:
        """Asks the master shard for every shard's address (ServiceDiscovery)."""
        master = cls([_unix_url(master_uds_path)])
        try:
            found = await master._stubs[0].ServiceDiscovery(pb.ServiceDiscoveryRequest())
        finally:
            await master.close()
        return cls(list(found.urls) or [_unix_url(master_uds_path)])

    @property
    def world_size(self) -> int:
        return len(self._stubs)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def _all(
        self, call: Callable[[generate_pb2_grpc.TextGenerationServiceStub], Awaitable[T]]
    ) -> T:
        answers = await asyncio.gather(*(call(stub) for stub in self._stubs))
        return answers[0]

    async def _ordered(self, method: str, request: object) -> Any:
        """A call that changes the shards' state, numbered so every rank runs it in this order."""
        metadata = ((CALL_SEQUENCE_KEY, str(next(self._sequence))),)
        return await self._all(lambda stub: getattr(stub, method)(request, metadata=metadata))

    async def info(self) -> pb.InfoResponse:
        return await self._all(lambda stub: stub.Info(pb.InfoRequest()))

    async def health(self) -> None:
        await self._all(lambda stub: stub.Health(pb.HealthRequest()))

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        return await self._ordered("Warmup", request)

    async def prefill(self, batch: pb.Batch) -> StepResult:
        return step_result(await self._ordered("Prefill", pb.PrefillRequest(batch=batch)))

    async def decode(self, batches: Sequence[pb.CachedBatch]) -> StepResult:
        request = pb.DecodeRequest(batches=list(batches))
        return step_result(await self._ordered("Decode", request))

    async def filter_batch(
        self,
        batch_id: int,
        request_ids: Sequence[int],
        stopped_sequences: Sequence[pb.SequenceRef] = (),
    ) -> pb.CachedBatch | None:
        request = filter_request(batch_id, request_ids, stopped_sequences)
        answer: pb.FilterBatchResponse = await self._ordered("FilterBatch", request)
        return answer.batch if answer.HasField("batch") else None

    async def clear_cache(self, batch_id: int | None = None) -> None:
        await self._ordered("ClearCache", clear_cache_request(batch_id))

    async def stats(self) -> pb.StatsResponse:
        return await self._all(lambda stub: stub.Stats(pb.StatsRequest()))


def _unix_url(path: str) -> str:
    return path if path.startswith("unix:") else f"unix://{path}"
