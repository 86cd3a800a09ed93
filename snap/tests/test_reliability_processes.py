"""The router in front of real shard processes on the tiny model: disconnects cancel within one
decode step and free their KV blocks, an injected Decode failure answers 424 and the server
recovers, SIGTERM drains `shardline-router`, and a short soak finds no leak."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from transformers import AutoTokenizer

from benchmarks.soak import SoakConfig, soak
from shardline.router.client import ShardedClient
from shardline.router.server import create_app
from shardline.router.startup import RouterSettings, start_router
from shardline.shards.fault_injection import ENV_VAR
from tests.shard_harness import free_port

pytestmark = pytest.mark.slow

LONG = {"inputs": "the city", "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
SHORT = {"inputs": "north river cache", "parameters": {"max_new_tokens": 8, "details": True}}
ROUTER_LIMITS = ["--max-input-tokens", "128", "--max-total-tokens", "512"]


def _start_shard(model_dir: Path, prefix: str, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "shardline.shards.cli", "serve", str(model_dir)]
    command += ["--uds-path", prefix, "--device", "cpu", "--kv-cache-bytes", str(16 << 20)]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    deadline = time.monotonic() + 120
    while not Path(f"{prefix}-0").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the shard did not start")
        time.sleep(0.2)
    return process


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def shard(tiny_llama_dir: Path, tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    prefix = str(tmp_path_factory.mktemp("uds") / "shard")
    process = _start_shard(tiny_llama_dir, prefix, {})
    yield f"{prefix}-0", process
    _stop(process)


@pytest.fixture
def faulty_shard(tiny_llama_dir: Path, tmp_path) -> Iterator[str]:
    prefix = str(tmp_path / "shard")
    process = _start_shard(tiny_llama_dir, prefix, {ENV_VAR: "decode:3"})
    yield f"{prefix}-0"
    _stop(process)


async def _router(socket: str, model_dir: Path) -> AsyncIterator:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shards = await ShardedClient.connect(socket)
    ctx = await start_router(shards, tokenizer, RouterSettings("tiny", max_total_tokens=512))
    client = TestClient(TestServer(create_app(ctx), handler_cancellation=True))
    await client.start_server()
    try:
        yield client, ctx, shards
    finally:
        await client.close()
        await ctx.batcher.stop()
        await shards.close()


@pytest.fixture
async def router(shard, tiny_llama_dir):
    async for started in _router(shard[0], tiny_llama_dir):
        yield started


async def _all_blocks_free(shards: ShardedClient, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = await shards.stats()
        if stats.free_blocks == stats.total_blocks and stats.num_sequences == 0:
            return True
        await asyncio.sleep(0.02)
    return False


def _decodes(ctx) -> float:
    return ctx.metrics.batch_inference_count.value(method="decode")


@pytest.mark.parametrize("path", ["/generate_stream", "/generate"])
async def test_a_disconnect_cancels_within_one_decode_step(router, path):
    client, ctx, shards = router
    before = await (await client.post("/generate", json=SHORT)).json()
    started = _decodes(ctx)
    request = asyncio.create_task(client.post(path, json=LONG))
    while _decodes(ctx) < started + 5:
        await asyncio.sleep(0.005)
    assert (await shards.stats()).num_sequences == 1
    if path == "/generate_stream":
        (await request).close()
    else:
        request.cancel()  # the client gives up: its connection closes
    closed_at = _decodes(ctx)
    while ctx.batcher.running_size:
        await asyncio.sleep(0.001)
    assert _decodes(ctx) - closed_at <= 1, "more than one decode step ran after the disconnect"
    assert await _all_blocks_free(shards)
    assert await (await client.post("/generate", json=SHORT)).json() == before


async def test_an_injected_decode_failure_is_424_and_the_server_recovers(
    faulty_shard, tiny_llama_dir
):
    async for client, _, shards in _router(faulty_shard, tiny_llama_dir):
        answers = await asyncio.gather(*(client.post("/generate", json=SHORT) for _ in range(3)))
        for answer in answers:
            error = await answer.json()
            assert answer.status == 424, error
            assert error["error_type"] == "generation"
            assert "injected fault in decode call 3" in error["error"]
        assert await _all_blocks_free(shards)
        answer = await client.post("/generate", json=SHORT)
        assert answer.status == 200
        assert (await answer.json())["details"]["generated_tokens"] == 8
        assert await _all_blocks_free(shards)


# ---- shardline-router as a process -------------------------------------------------------------


@pytest.fixture
def router_process(shard, tiny_llama_dir) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    command = [str(Path(sys.executable).parent / "shardline-router"), *ROUTER_LIMITS]
    command += ["--tokenizer-name", str(tiny_llama_dir), "--master-shard-uds-path", shard[0]]
    command += ["--hostname", "127.0.0.1", "--port", str(port), "--shutdown-timeout", "60"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the router did not start")
        time.sleep(0.2)
    yield url, process
    _stop(process)


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


async def test_short_soak_finds_no_leak(router_process, shard):
    url, process = router_process
    config = SoakConfig(
        url=url,
        requests=300,
        duration_s=45,
        concurrency=8,
        max_new_tokens=16,
        pids=(process.pid, shard[1].pid),
    )
    report = await soak(config)
    assert report.ok, (report.failures, report)
    assert report.sent == 300 and report.disconnects and report.bad_inputs
    assert report.kv_blocks_total and report.kv_blocks_leaked == 0


async def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(router_process):
    url, process = router_process
    body = {"inputs": "the city", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/generate_stream", json=body) as answer,
    ):
        await answer.content.readuntil(b"\n\n")
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with session.post(f"{url}/generate", json=SHORT) as refused:
            assert refused.status == 503
            assert (await refused.json())["error_type"] == "shutting_down"
        raw = await answer.read()
    events = [json.loads(c[5:]) for c in raw.split(b"\n\n") if c.startswith(b"data:")]
    assert events[-1]["details"]["generated_tokens"] == 200
    assert await asyncio.to_thread(process.wait, 30) == 0
