"""A shard alive but stuck: a step call past its deadline ends the router, never hangs it.

In front of a fake shard whose Decode times out: every request, running or queued, gets 424,
the stuck shard gets no more calls, /health answers 503 and new requests 424.

Under the real launcher (`--num-shard 2`, `--shard-step-timeout 3`), SIGSTOP standing in for a
deadlock or a hung NCCL collective:

Mid-request: the step call runs past its deadline, every in-flight client gets 424 `generation`
(an SSE error event once a stream has started), the router exits 1 and the launcher tears
everything down and exits 1, leaving no process and no socket file. Idle: /health asks every
shard's Health under a short deadline and answers 503 while one is stopped, 200 once it runs
again. Stopped processes are continued (then killed) in teardown, so a failing test leaves
nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest

from shardline.proto import generate_pb2 as pb
from shardline.proto import generate_pb2_grpc
from shardline.router.cli import build_parser, shard_deadlines
from shardline.router.client import ShardDeadlines, ShardedClient, ShardTimeoutError, StepResult
from tests.fake_shard import FakeShardClient, fixed_script, router_client
from tests.launcher_harness import Launcher, is_alive
from tests.test_shard_kill import _descendants, _outcome, _shard_pid, _start, _until_batched

pytestmark = pytest.mark.slow

STEP_TIMEOUT_S = 3
ANSWER_MARGIN_S = 4  # past the step timeout: the answers go out
EXIT_MARGIN_S = 10  # past the step timeout: the router drains and exits, the launcher tears down


STUCK = "the shards did not answer Decode within 3 s: a shard is stuck"
LONG_BODY = {"inputs": "a prompt", "parameters": {"max_new_tokens": 100, "ignore_eos": True}}


@dataclass
class StuckShard(FakeShardClient):
    """Its Decode runs past the deadline from the `good_decodes`+1th call on."""

    good_decodes: int = 3

    async def decode(
        self, batches: Sequence[pb.CachedBatch], launch_next: bool = False
    ) -> StepResult:
        if len(self.calls_of("decode")) >= self.good_decodes:
            self.calls.append(("decode timed out",))
            raise ShardTimeoutError(STUCK)
        return await super().decode(batches, launch_next)


async def test_a_step_past_its_deadline_fails_every_request_and_marks_the_router_stuck(tokenizer):
    fake = StuckShard(fixed_script(tokenizer), tokenizer.eos_token_id, step_delay=0.01)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128, max_batch_size=2)
    try:
        assert (await client.get("/health")).status == 200
        answers = await asyncio.gather(
            *(client.post("/generate", json=LONG_BODY) for _ in range(3))
        )
        for answer in answers:
            assert answer.status == 424
            assert await answer.json() == {"error": STUCK, "error_type": "generation"}
        assert fake.calls[-1] == ("decode timed out",), "a call went to the stuck shard after"
        assert await asyncio.wait_for(ctx.batcher.wait_stuck(), 1) is ctx.batcher.stuck
        health = await client.get("/health")
        assert health.status == 503
        assert (await health.json())["error_type"] == "healthcheck"
        assert (await client.post("/generate", json=LONG_BODY)).status == 424
    finally:
        await client.close()
        await ctx.batcher.stop()


@dataclass
class SlowShard(FakeShardClient):
    """Its `slow_decode`th Decode takes `slow_for` seconds; its Health hangs when `hung`."""

    slow_decode: int = 3
    slow_for: float = 2.0
    hung: bool = False

    async def decode(
        self, batches: Sequence[pb.CachedBatch], launch_next: bool = False
    ) -> StepResult:
        if len(self.calls_of("decode")) + 1 == self.slow_decode:
            await asyncio.sleep(self.slow_for)
        return await super().decode(batches, launch_next)

    async def health(self) -> None:
        if self.hung:
            await asyncio.sleep(3600)


async def _timed_health(client) -> tuple[int, dict | None, float]:
    asked_at = time.monotonic()
    answer = await client.get("/health")
    body = await answer.json() if answer.status != 200 else None
    return answer.status, body, time.monotonic() - asked_at


async def test_health_is_503_while_a_step_runs_past_half_its_deadline_then_200(tokenizer):
    """Readiness leaves before the deadline (2 s here) fails everything: a step past 1 s."""
    fake = SlowShard(fixed_script(tokenizer), tokenizer.eos_token_id, step_delay=0.01)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128, shard_step_timeout=2.0)
    try:
        assert (await _timed_health(client))[0] == 200
        request = asyncio.create_task(client.post("/generate", json=LONG_BODY))
        while len(fake.calls_of("decode")) < fake.slow_decode - 1:
            await asyncio.sleep(0.01)
        statuses = []
        while not request.done():
            status, body, took = await _timed_health(client)
            assert took < 2, took
            statuses.append(status)
            if status == 503:
                assert body["error_type"] == "healthcheck" and "step" in body["error"], body
            await asyncio.sleep(0.1)
        assert 503 in statuses and statuses[0] == 200, statuses
        assert (await request).status == 200
        assert (await _timed_health(client))[0] == 200
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_health_answers_within_2_s_when_a_shard_does_not_answer(tokenizer):
    fake = SlowShard(fixed_script(tokenizer), tokenizer.eos_token_id, hung=True)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128)
    try:
        status, body, took = await _timed_health(client)
        assert status == 503 and body["error_type"] == "healthcheck", body
        assert took < 2, took
    finally:
        await client.close()
        await ctx.batcher.stop()


@pytest.fixture
def launched(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Launcher, str]]:
    monkeypatch.setenv("SHARD_STEP_TIMEOUT", str(STEP_TIMEOUT_S))
    launcher, url = _start(tiny_llama_dir, tmp_path)
    pids = _descendants(launcher.process.pid)
    try:
        yield launcher, url
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        launcher.kill()


async def _health(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/health") as answer:
        return answer.status


async def _until_unready(session: aiohttp.ClientSession, url: str) -> float:
    """Seconds until /health answers 503; each answer must come within 2 s."""
    started = time.monotonic()
    while True:
        asked_at = time.monotonic()
        status = await _health(session, url)
        assert time.monotonic() - asked_at < 2
        if status == 503:
            return time.monotonic() - started
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("rank", [0, 1])
async def test_a_stopped_shard_fails_in_flight_requests_and_everything_exits(
    launched: tuple[Launcher, str], tmp_path: Path, rank: int
) -> None:
    launcher, url = launched
    pids = _descendants(launcher.process.pid)
    timeout = aiohttp.ClientTimeout(total=STEP_TIMEOUT_S + EXIT_MARGIN_S + 10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        paths = ["/generate_stream", "/generate"] * 2
        requests = [
            asyncio.create_task(_outcome(session, url, path, f"prompt {i}"))
            for i, path in enumerate(paths)
        ]
        await asyncio.wait_for(_until_batched(session, url, len(requests)), 30)
        os.kill(_shard_pid(launcher, rank), signal.SIGSTOP)
        stopped_at = time.monotonic()
        unready_after = await _until_unready(session, url)
        outcomes = await asyncio.gather(*requests)
        answered_after = time.monotonic() - stopped_at
    assert unready_after < STEP_TIMEOUT_S - 0.5, "readiness must go before the requests fail"
    code = await asyncio.to_thread(launcher.wait, STEP_TIMEOUT_S + EXIT_MARGIN_S + 5)
    exited_after = time.monotonic() - stopped_at
    expected = {"/generate_stream": "error event generation", "/generate": "status 424 generation"}
    assert outcomes == [expected[path] for path in paths]
    # The deadline runs from the step's start, which may come a little before the SIGSTOP.
    assert STEP_TIMEOUT_S - 1 <= answered_after < STEP_TIMEOUT_S + ANSWER_MARGIN_S, answered_after
    assert code == 1 and exited_after < STEP_TIMEOUT_S + EXIT_MARGIN_S, (code, exited_after)
    log = "\n".join(launcher.lines)
    assert f"within {STEP_TIMEOUT_S} s: a shard is stuck" in log
    assert "router exited with code 1" in log
    assert not any(is_alive(pid) for pid in pids)
    assert list(tmp_path.glob("shardline-*")) == []
    assert list(tmp_path.rglob("*shard*")) == []


async def test_health_is_503_while_an_idle_shard_is_stopped(
    launched: tuple[Launcher, str],
) -> None:
    launcher, url = launched
    shard = _shard_pid(launcher, 1)
    async with aiohttp.ClientSession() as session:
        assert await _health(session, url) == 200
        os.kill(shard, signal.SIGSTOP)
        asked_at = time.monotonic()
        assert await _health(session, url) == 503
        assert time.monotonic() - asked_at < 2
        os.kill(shard, signal.SIGCONT)
        assert await _health(session, url) == 200


class _SlowWarmupServicer(generate_pb2_grpc.TextGenerationServiceServicer):
    def Warmup(self, request, context):
        time.sleep(3)
        return pb.WarmupResponse()


async def test_a_warmup_past_its_deadline_raises_instead_of_hanging(tmp_path):
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(_SlowWarmupServicer(), server)
    socket = f"unix://{tmp_path}/shard"
    server.add_insecure_port(socket)
    server.start()
    client = ShardedClient([socket], ShardDeadlines(warmup=0.3))
    started = time.monotonic()
    try:
        with pytest.raises(ShardTimeoutError, match="Warmup"):
            await client.warmup(pb.WarmupRequest(max_prefill_tokens=16))
    finally:
        await client.close()
        server.stop(grace=None)
    assert time.monotonic() - started < 2


def test_the_router_takes_its_warmup_deadline_from_the_command_line():
    parse = build_parser().parse_args
    args = parse(["--tokenizer-name", "m", "--shard-warmup-timeout", "12"])
    assert shard_deadlines(args).warmup == 12
    assert shard_deadlines(parse(["--tokenizer-name", "m"])).warmup == 1800
