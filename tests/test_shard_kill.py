"""Issue 9, failures: a shard SIGKILLed mid-request under the real launcher (`--num-shard 2`).

Like TGI, the router answers every in-flight request with an error as soon as a shard call
fails (424 `generation`, or an SSE error event once a stream has started): the dead shard's
unix socket breaks at once, and the router drains those answers out before it stops. The
launcher then tears everything down and exits 1, leaving no process and no socket file.
Requests go through aiohttp and through `shardline_client`, which raises `GenerationError`.
Clients run under a timeout, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import unused_port
from shardline_client import AsyncClient, ShardlineError

from tests.launcher_harness import LIMITS, Launcher, is_alive

pytestmark = pytest.mark.slow

LONG = {"max_new_tokens": 480, "ignore_eos": True}
CLIENT_TIMEOUT_S = 20
EXIT_WITHIN_S = 5


def _start(model_dir: Path, tmp_path: Path) -> tuple[Launcher, str]:
    env = {**os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    argv = ["--model-id", str(model_dir), "--num-shard", "2", "--json-output"]
    argv += ["--hostname", "127.0.0.1", "--port", str(unused_port())]
    argv += ["--master-port", str(unused_port()), *LIMITS]
    launcher = Launcher(argv, env)
    ready = launcher.wait_for_line("Shardline is ready", timeout_s=180)
    return launcher, json.loads(ready)["message"].split(" on ")[1]


async def _outcome(session: aiohttp.ClientSession, url: str, path: str, prompt: str) -> str:
    """How one long request ended: `status N`, `error event <type>`, `closed`, or `completed`."""
    body = {"inputs": prompt, "parameters": LONG}
    try:
        async with session.post(url + path, json=body) as answer:
            if answer.status != 200:
                return f"status {answer.status} {(await answer.json())['error_type']}"
            async for line in answer.content:
                if line.startswith(b"data:") and b'"error"' in line:
                    return f"error event {json.loads(line[5:])['error_type']}"
            await answer.read()
            return "completed"
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
        return "closed"


async def _until_batched(session: aiohttp.ClientSession, url: str, size: int) -> None:
    """Returns once `size` requests are in the running batch."""
    while True:
        async with session.get(url + "/metrics") as answer:
            metrics = await answer.text()
        if f"tgi_batch_current_size {size:.1f}" in metrics:
            return
        await asyncio.sleep(0.02)


async def _client_outcome(url: str, stream: bool) -> str:
    """How a long request through `shardline_client.AsyncClient` ended: the error it raised."""
    client = AsyncClient(url, timeout=CLIENT_TIMEOUT_S)
    try:
        if stream:
            async for _ in client.generate_stream("client stream", **LONG):
                pass
        else:
            await client.generate("client request", **LONG)
    except ShardlineError as error:
        return f"{type(error).__name__} {error.error_type}"
    return "completed"


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid`: the launcher's children and anything they started."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _shard_pid(launcher: Launcher, rank: int) -> int:
    return next(
        int(event["pid"])
        for event in launcher.events()
        if event["message"] == f"shard {rank} started"
    )


@pytest.mark.parametrize("rank", [0, 1])
async def test_a_killed_shard_fails_every_in_flight_request_and_the_launcher_exits(
    tiny_llama_dir: Path, tmp_path: Path, rank: int
) -> None:
    launcher, url = _start(tiny_llama_dir, tmp_path)
    try:
        pids = _descendants(launcher.process.pid)
        assert set(launcher.child_pids()) <= pids
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            paths = ["/generate_stream", "/generate"] * 3
            requests = [
                asyncio.create_task(_outcome(session, url, path, f"prompt {i}"))
                for i, path in enumerate(paths)
            ]
            requests += [asyncio.create_task(_client_outcome(url, s)) for s in (True, False)]
            await asyncio.wait_for(_until_batched(session, url, len(requests)), 30)
            assert not any(request.done() for request in requests)
            os.kill(_shard_pid(launcher, rank), signal.SIGKILL)
            killed_at = time.monotonic()
            outcomes = await asyncio.gather(*requests)
            code = await asyncio.to_thread(launcher.wait, EXIT_WITHIN_S + 5)
        exited_after = time.monotonic() - killed_at
    finally:
        launcher.kill()
    print(f"rank {rank} SIGKILL: {outcomes}; launcher exit {code} after {exited_after:.2f} s")
    expected = {"/generate_stream": "error event generation", "/generate": "status 424 generation"}
    assert outcomes[: len(paths)] == [expected[path] for path in paths]
    assert outcomes[len(paths) :] == ["GenerationError generation"] * 2
    assert code == 1 and exited_after < EXIT_WITHIN_S, (code, exited_after)
    assert f"shard {rank} was killed by SIGKILL" in "\n".join(launcher.lines)
    assert not any(is_alive(pid) for pid in pids)
    assert list(tmp_path.glob("shardline-*")) == []
    assert list(tmp_path.rglob("*shard*")) == []
