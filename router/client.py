"""The router's view of the shards: a `ShardClient` protocol and its gRPC implementation.

Every call goes to every shard at once and the shards run in lockstep; the last shard's answer
is the one used (TGI's sharded client uses shard 0's: with pipeline stages, only the last stage
answers a Decode with its tokens, the others before they are chosen).

Every call has a deadline (`ShardDeadlines`): a shard that is alive but stuck (a stopped process,
a deadlock, a hung collective) makes the call raise `ShardTimeoutError` instead of hanging the
router forever.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from shardline.cluster_token import METADATA_KEY
from shardline.proto import CALL_SEQUENCE_KEY, generate_pb2_grpc
from shardline.proto import generate_pb2 as pb
from shardline.router.request_types import ValidRequest
from shardline.shard_answers import StepResult, step_result

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


@dataclass(frozen=True)
class ShardDeadlines:
    """Seconds a shard call may take; None waits forever.

    `probe`: Health, Info, Stats, ServiceDiscovery (answered at once by a live shard).
    `step`: Prefill, Decode, FilterBatch, ClearCache (the worst-case step, generously).
    `warmup`: Warmup, which loads the KV cache and captures CUDA graphs (minutes on a GPU).
    """

    probe: float = 5.0
    step: float | None = 60.0
    warmup: float | None = None


class ShardTimeoutError(Exception):
    """A shard call ran past its deadline: a shard is stuck, and tensor-parallel ranks cannot
    recover from a half-run step."""


class ShardClient(Protocol):
    """Each call raises `ShardTimeoutError` when the shards do not answer within its deadline."""

    async def info(self) -> pb.InfoResponse: ...

    async def health(self) -> None:
        """Raises unless every shard answers within a short deadline."""

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse: ...

    async def prefill(
        self,
        batch: pb.Batch,
        cached_batches: Sequence[pb.CachedBatch] = (),
        launch_next: bool = False,
    ) -> StepResult: ...

    async def decode(
        self, batches: Sequence[pb.CachedBatch], launch_next: bool = False
    ) -> StepResult: ...

    async def filter_batch(
        self,
        batch_id: int,
        request_ids: Sequence[int],
        stopped_sequences: Sequence[pb.SequenceRef] = (),
    ) -> pb.CachedBatch | None: ...

    async def clear_cache(
        self, batch_id: int | None = None, keep_prefix_cache: bool = False
    ) -> None:
        """Frees one batch, or (None) every batch, partial prompt and the prefix-cache index
        (that one kept with `keep_prefix_cache`)."""

    async def drop_prefills(self, request_ids: Sequence[int]) -> None:
        """Frees what the shards hold of these requests' prompts prefilled in part."""
        ...

    async def stats(self) -> pb.StatsResponse: ...


def request_proto(
    request: ValidRequest, request_id: int, prefix_len: int = 0, chunk_len: int = 0
) -> pb.Request:
    """The shard's message for a request (or, chunked, for the prompt chunk at `prefix_len`).

    Raises ValueError (a number out of its field's range), TypeError or UnicodeEncodeError (a
    lone surrogate) where the request cannot be encoded: validation builds it once to refuse
    such a request before it joins a batch.
    """
    chooser, stopping = request.params.to_proto(request.max_new_tokens)
    chooser.grammar_index = request.grammar_index
    return pb.Request(
        id=request_id,
        input_ids=request.input_ids,
        prefix_len=prefix_len,
        chunk_len=chunk_len,
        decoder_input_details=request.decoder_input_details,
        parameters=chooser,
        stopping_parameters=stopping,
        top_n_tokens=request.top_n_tokens,
        num_sequences=request.params.num_sequences,
        beam_search=request.params.beam_search_proto(),
        cache_salt=request.params.cache_salt or "",
    )


def filter_request(
    batch_id: int, request_ids: Sequence[int], stopped_sequences: Sequence[pb.SequenceRef] = ()
) -> pb.FilterBatchRequest:
    return pb.FilterBatchRequest(
        batch_id=batch_id, request_ids=list(request_ids), stopped_sequences=list(stopped_sequences)
    )


def clear_cache_request(
    batch_id: int | None, keep_prefix_cache: bool = False
) -> pb.ClearCacheRequest:
    """For one batch, or (None) for all of them."""
    if batch_id is None:
        return pb.ClearCacheRequest(keep_prefix_cache=keep_prefix_cache)
    return pb.ClearCacheRequest(id=batch_id)


def drop_prefills_request(request_ids: Sequence[int]) -> pb.ClearCacheRequest:
    return pb.ClearCacheRequest(prefilling_request_ids=list(request_ids))


class ShardedClient:
    """gRPC to every shard: over unix sockets (`unix://PATH`), and to the shards of other nodes
    over TCP (`tcp://HOST:PORT`), every call carrying the cluster `token`. `call_numbers`: the
    numbers of the calls that change the shards' state, shared by the clients that follow one
    another on the same shards (each shard runs them in that order)."""

    def __init__(
        self,
        urls: Sequence[str],
        deadlines: ShardDeadlines = ShardDeadlines(),
        token: str | None = None,
        call_numbers: Iterator[int] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one shard url is needed")
        self.deadlines = deadlines
        self._auth = () if token is None else ((METADATA_KEY, token),)
        self._channels = [
            grpc.aio.insecure_channel(url.removeprefix("tcp://"), options=_CHANNEL_OPTIONS)
            for url in urls
        ]
        self._stubs = [generate_pb2_grpc.TextGenerationServiceStub(ch) for ch in self._channels]
        self._sequence = itertools.count() if call_numbers is None else call_numbers

    @classmethod
    async def connect(
        cls,
        master_uds_path: str,
        deadlines: ShardDeadlines = ShardDeadlines(),
        token: str | None = None,
        call_numbers: Iterator[int] | None = None,
    ) -> ShardedClient:
        """Asks the master shard for every shard's address (ServiceDiscovery)."""
        master = cls([_unix_url(master_uds_path)], deadlines, token)
        try:
            request = pb.ServiceDiscoveryRequest()
            found = await master._all("ServiceDiscovery", request, deadlines.probe)
        finally:
            await master.close()
        urls = list(found.urls) or [_unix_url(master_uds_path)]
        return cls(urls, deadlines, token, call_numbers)

    @property
    def world_size(self) -> int:
        return len(self._stubs)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def _all(
        self,
        method: str,
        request: object,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Any:
        metadata = metadata + self._auth
        calls = [
            getattr(stub, method)(request, timeout=timeout, metadata=metadata)
            for stub in self._stubs
        ]
        try:
            answers = await asyncio.gather(*calls)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ShardTimeoutError(
                    f"the shards did not answer {method} within {timeout:g} s: a shard is stuck"
                ) from error
            raise
        return answers[-1]

    async def _ordered(self, method: str, request: object, timeout: float | None) -> Any:
        """A call that changes the shards' state, numbered so every rank runs it in this order."""
        metadata = ((CALL_SEQUENCE_KEY, str(next(self._sequence))),)
        return await self._all(method, request, timeout, metadata)

    async def info(self) -> pb.InfoResponse:
        return await self._all("Info", pb.InfoRequest(), self.deadlines.probe)

    async def health(self) -> None:
        await self._all("Health", pb.HealthRequest(), self.deadlines.probe)

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        return await self._ordered("Warmup", request, self.deadlines.warmup)

    async def prefill(
        self,
        batch: pb.Batch,
        cached_batches: Sequence[pb.CachedBatch] = (),
        launch_next: bool = False,
    ) -> StepResult:
        request = pb.PrefillRequest(
            batch=batch, cached_batches=list(cached_batches), launch_next=launch_next
        )
        return step_result(await self._ordered("Prefill", request, self.deadlines.step))

    async def decode(
        self, batches: Sequence[pb.CachedBatch], launch_next: bool = False
    ) -> StepResult:
        request = pb.DecodeRequest(batches=list(batches), launch_next=launch_next)
        return step_result(await self._ordered("Decode", request, self.deadlines.step))

    async def filter_batch(
        self,
        batch_id: int,
        request_ids: Sequence[int],
        stopped_sequences: Sequence[pb.SequenceRef] = (),
    ) -> pb.CachedBatch | None:
        request = filter_request(batch_id, request_ids, stopped_sequences)
        answer: pb.FilterBatchResponse = await self._ordered(
            "FilterBatch", request, self.deadlines.step
        )
        return answer.batch if answer.HasField("batch") else None

    async def clear_cache(
        self, batch_id: int | None = None, keep_prefix_cache: bool = False
    ) -> None:
        request = clear_cache_request(batch_id, keep_prefix_cache)
        await self._ordered("ClearCache", request, self.deadlines.step)

    async def drop_prefills(self, request_ids: Sequence[int]) -> None:
        request = drop_prefills_request(request_ids)
        await self._ordered("ClearCache", request, self.deadlines.step)

    async def stats(self) -> pb.StatsResponse:
        return await self._all("Stats", pb.StatsRequest(), self.deadlines.probe)


def _unix_url(path: str) -> str:
    """A socket path as a gRPC url; a url (`unix:`, `tcp://`, with Ray) as it is."""
    return path if path.startswith(("unix:", "tcp://")) else f"unix://{path}"
