"""The shard's gRPC server: one grpc.aio servicer on a unix socket, in front of the engine.

Engine calls run one at a time on a dedicated thread, so Health and Info answer while a long
forward pass runs, and every rank sees the router's calls in the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc

from shardline.proto import CALL_SEQUENCE_KEY, generate_pb2_grpc
from shardline.proto import generate_pb2 as pb
from shardline.shards.engine import ShardEngine
from shardline.shards.kv_cache import KVCacheExhaustedError
from shardline.shards.request_checks import InvalidRequestError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a numbered call waits for the calls numbered before it; past that the missing ones
# are taken as never coming (the router cancelled them before they were sent).
_SEQUENCE_GAP_TIMEOUT_S = 1.0

_STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (KVCacheExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def socket_path(uds_prefix: str, rank: int) -> str:
    """TGI's naming: the prefix `/tmp/text-generation-server` gives `...-server-0` for rank 0."""
    return f"{uds_prefix}-{rank}"


class TextGenerationService(generate_pb2_grpc.TextGenerationServiceServicer):
    def __init__(self, engine: ShardEngine, uds_prefix: str) -> None:
        self.engine = engine
        self.uds_prefix = uds_prefix
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="engine", initializer=engine.bind_thread
        )
        self._turn = asyncio.Condition()
        self._next_sequence = 0

    async def _run(self, context: grpc.aio.ServicerContext, method: Callable[..., T], *args) -> T:
        try:
            future = await self._submit_in_order(context, method, *args)
            return await future
        except Exception as error:  # every failure becomes a gRPC status, never a dead shard
            status = next(
                (code for kind, code in _STATUS_BY_ERROR if isinstance(error, kind)),
                grpc.StatusCode.INTERNAL,
            )
            if status is grpc.StatusCode.INTERNAL:
                logger.exception("%s failed", getattr(method, "__name__", "call"))
            await context.abort(status, f"{type(error).__name__}: {error}")
            raise  # unreachable: abort raises

    async def _submit_in_order(
        self, context: grpc.aio.ServicerContext, method: Callable[..., T], *args
    ) -> asyncio.Future[T]:
        """Hands the call to the engine thread after every call numbered before it."""
        loop = asyncio.get_running_loop()
        sequence = dict(context.invocation_metadata() or ()).get(CALL_SEQUENCE_KEY)
        if sequence is None:
            return loop.run_in_executor(self._executor, method, *args)
        number = int(sequence)
        async with self._turn:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._turn.wait_for(lambda: self._next_sequence >= number),
                    _SEQUENCE_GAP_TIMEOUT_S,
                )
            future = loop.run_in_executor(self._executor, method, *args)
            self._next_sequence = max(self._next_sequence, number + 1)
            self._turn.notify_all()
        return future

    async def Info(self, request, context):
        return self.engine.info()

    async def Health(self, request, context):
        return pb.HealthResponse()

    async def ServiceDiscovery(self, request, context):
        urls = [
            f"unix://{socket_path(self.uds_prefix, rank)}"
            for rank in range(self.engine.tp.stage.world_size)
        ]
        return pb.ServiceDiscoveryResponse(urls=urls)

    async def Stats(self, request, context):
        return await self._run(context, self.engine.stats)

    async def ClearCache(self, request, context):
        return await self._run(context, self.engine.clear_cache, request)

    async def FilterBatch(self, request, context):
        return await self._run(context, self.engine.filter_batch, request)

    async def Warmup(self, request, context):
        return await self._run(context, self.engine.warmup, request)

    async def Prefill(self, request, context):
        return await self._run(context, self.engine.prefill, request)

    async def Decode(self, request, context):
        return await self._run(context, self.engine.decode, request)


async def serve(engine: ShardEngine, uds_prefix: str, rank: int) -> None:
    """Serves until SIGTERM or SIGINT, then stops and removes the socket file."""
    path = Path(socket_path(uds_prefix, rank))
    path.unlink(missing_ok=True)
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        ]
    )
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(
        TextGenerationService(engine, uds_prefix), server
    )
    server.add_insecure_port(f"unix://{path}")
    previous_umask = os.umask(0o177)
    try:
        await server.start()
    finally:
        os.umask(previous_umask)
    path.chmod(0o600)
    logger.info("shard ready", extra={"socket": str(path)})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shard stopping")
    await server.stop(grace=5)
    path.unlink(missing_ok=True)
