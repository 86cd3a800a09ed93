"""The shard's gRPC server: one grpc.aio servicer on a unix socket (and, on a node other than
the router's, a TCP port whose every call must carry the cluster token), in front of the engine.

Engine calls run one at a time on a dedicated thread, so Health and Info answer while a long
forward pass runs, and every rank sees the router's calls in the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from shardline.cluster_token import METADATA_KEY, TOKEN_ENV, same_token
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


@dataclass(frozen=True)
class Listen:
    """Where a shard listens: its unix socket, and the TCP port a router on another node calls
    (None: none) with the cluster token it requires there."""

    uds_prefix: str
    rank: int
    tcp_port: int | None = None
    token: str | None = None

    def check(self) -> None:
        if self.tcp_port is not None and self.token is None:
            raise SystemExit(f"--grpc-port needs the cluster token in {TOKEN_ENV}")

    def url(self, master_addr: str) -> str:
        """The address the router reaches this shard at."""
        if self.tcp_port is None:
            return f"unix://{socket_path(self.uds_prefix, self.rank)}"
        return f"tcp://{_address_towards(master_addr)}:{self.tcp_port}"


def _address_towards(master_addr: str) -> str:
    """This host's address on the route to node 0 (where the router runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((master_addr, 9))
        return probe.getsockname()[0]


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) a call that does not carry the cluster token."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata or ()).get(METADATA_KEY)
        if same_token(self._token, given):
            return await continuation(handler_call_details)
        return grpc.unary_unary_rpc_method_handler(_refuse)


async def _refuse(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the cluster token is missing or wrong")


class TextGenerationService(generate_pb2_grpc.TextGenerationServiceServicer):
    def __init__(self, engine: ShardEngine, urls: list[str]) -> None:
        self.engine = engine
        self.urls = urls
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
        return pb.ServiceDiscoveryResponse(urls=self.urls)

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


async def serve(engine: ShardEngine, listen: Listen, urls: list[str]) -> None:
    """Serves until SIGTERM or SIGINT, then stops and removes the socket file. `urls`: every
    rank's address, in rank order (ServiceDiscovery). The unix socket (owner only) needs no
    token; the TCP port, a second server of the same service, refuses calls without it."""
    path = Path(socket_path(listen.uds_prefix, listen.rank))
    path.unlink(missing_ok=True)
    service = TextGenerationService(engine, urls)
    servers = [_server(service, f"unix://{path}")]
    if listen.tcp_port is not None and listen.token is not None:
        servers.append(_server(service, f"0.0.0.0:{listen.tcp_port}", TokenCheck(listen.token)))
    previous_umask = os.umask(0o177)
    try:
        for server in servers:
            await server.start()
    finally:
        os.umask(previous_umask)
    path.chmod(0o600)
    logger.info("shard ready", extra={"socket": str(path), "tcp_port": listen.tcp_port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shard stopping")
    await asyncio.gather(*(server.stop(grace=5) for server in servers))
    path.unlink(missing_ok=True)


def _server(
    service: TextGenerationService, address: str, *interceptors: grpc.aio.ServerInterceptor
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=interceptors or None,
        options=[
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        ],
    )
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(service, server)
    server.add_insecure_port(address)
    return server
