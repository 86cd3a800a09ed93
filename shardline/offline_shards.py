"""The shards of the offline `LLM`: one in this process, or `world_size` shard processes started
by the launcher's `start_shards` and reached over gRPC."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator
from typing import Any

from shardline.in_process import InProcessShard
from shardline.shard_config import ShardConfig


class ShardProcesses:
    """`config.world_size` shard processes, started and watched as the launcher does."""

    def __init__(self, config: ShardConfig) -> None:
        from shardline.launcher.output import ChildOutput
        from shardline.launcher.shards import ShardLaunch, start_shards
        from shardline.launcher.supervisor import ChildDied, wait_until_ready

        self._socket_dir = tempfile.mkdtemp(prefix="shardline-llm-")
        self.launch = ShardLaunch(
            os.path.join(self._socket_dir, "shard"), "127.0.0.1", _free_port()
        )
        self._children = start_shards(config, self.launch, os.environ, ChildOutput(False))
        # One numbering of the calls over the clients of successive generate() calls: the shards
        # run numbered calls in order, and a client that started again at 0 would not be.
        self._call_numbers = itertools.count()
        atexit.register(self.close)
        try:
            wait_until_ready(
                self._children, self.launch.is_serving, self._children, threading.Event()
            )
        except ChildDied as died:
            self.close()
            raise RuntimeError(f"a shard process failed to start: {died}") from died

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        from shardline.launcher.commands import shard_socket
        from shardline.router.client import ShardedClient

        socket = shard_socket(self.launch.uds_prefix, 0)
        client = await ShardedClient.connect(socket, call_numbers=self._call_numbers)
        try:
            yield client
        finally:
            await client.close()

    def close(self) -> None:
        from shardline.launcher.supervisor import stop_children

        stop_children(self._children, timeout_s=30, abort=threading.Event())
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_shards(config: ShardConfig, own_process: bool = False) -> InProcessShard | ShardProcesses:
    """One shard in this process, unless `own_process` or the world is larger."""
    in_process = config.world_size == 1 and not own_process
    return InProcessShard(config) if in_process else ShardProcesses(config)
