"""The router's ShardClient over a ShardEngine in this process: one shard, no gRPC, and the
steps' answers handed over as plain data (shardline/shard_answers.py), never as protobuf.

`InProcessShard` builds that engine from a ShardConfig, as a shard process does from its flags.

Engine calls run on one worker thread, so the event loop streams step N's tokens while the
device computes step N+1's (the GIL is released while the host waits for the device).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from shardline.proto import generate_pb2 as pb
from shardline.router.client import clear_cache_request, drop_prefills_request, filter_request
from shardline.shard_answers import StepResult
from shardline.shard_config import ShardConfig
from shardline.shards.engine import ShardEngine

T = TypeVar("T")


class InProcessShardClient:
    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="engine", initializer=engine.bind_thread
        )

    async def _run(self, method: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, method, *args)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def info(self) -> pb.InfoResponse:
        return self.engine.info()

    async def health(self) -> None:
        return None

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        return await self._run(self.engine.warmup, request)

    async def prefill(
        self,
        batch: pb.Batch,
        cached_batches: Sequence[pb.CachedBatch] = (),
        launch_next: bool = False,
    ) -> StepResult:
        request = pb.PrefillRequest(
            batch=batch, cached_batches=list(cached_batches), launch_next=launch_next
        )
        return await self._run(self.engine.prefill_step, request)

    async def decode(
        self, batches: Sequence[pb.CachedBatch], launch_next: bool = False
    ) -> StepResult:
        request = pb.DecodeRequest(batches=list(batches), launch_next=launch_next)
        return await self._run(self.engine.decode_step, request)

    async def filter_batch(
        self,
        batch_id: int,
        request_ids: Sequence[int],
        stopped_sequences: Sequence[pb.SequenceRef] = (),
    ) -> pb.CachedBatch | None:
        request = filter_request(batch_id, request_ids, stopped_sequences)
        answer = await self._run(self.engine.filter_batch, request)
        return answer.batch if answer.batch.size else None

    async def clear_cache(
        self, batch_id: int | None = None, keep_prefix_cache: bool = False
    ) -> None:
        request = clear_cache_request(batch_id, keep_prefix_cache)
        await self._run(self.engine.clear_cache, request)

    async def drop_prefills(self, request_ids: Sequence[int]) -> None:
        await self._run(self.engine.clear_cache, drop_prefills_request(request_ids))

    async def stats(self) -> pb.StatsResponse:
        return await self._run(self.engine.stats)


class InProcessShard:
    """The one shard of `LLM(tensor_parallel_size=1)`, living as long as this process."""

    def __init__(self, config: ShardConfig) -> None:
        from shardline.shards.bootstrap import create_engine

        self.engine = create_engine(config)

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[InProcessShardClient]:
        client = InProcessShardClient(self.engine)
        try:
            yield client
        finally:
            await client.close()

    def close(self) -> None:
        """Nothing to stop: the engine lives as long as this process."""
