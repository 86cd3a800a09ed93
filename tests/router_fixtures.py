"""Router fixtures, loaded for every test module by conftest.py (a module may define its own):
`router`, `fake`, `tokenizer` (the app over a deterministic fake shard on a test client), `api`
(the official OpenAI client on `router`, as `openai_client` makes one for any test client),
`shard_socket` (a real shard process on the tiny llama) and `open_router` over it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from transformers import AutoTokenizer

from shardline.router.client import ShardedClient
from shardline.router.http import RouterRunner
from shardline.router.server import create_app
from shardline.router.startup import RouterSettings, start_router
from tests.fake_shard import FakeShardClient, fixed_script, router_client, tiny_tokenizer

if TYPE_CHECKING:
    from openai import AsyncOpenAI


class RouterTestServer(TestServer):
    """A test server on the router's own runner (protocol-level errors in TGI's error JSON)."""

    async def _make_runner(self, **kwargs) -> RouterRunner:
        return RouterRunner(self.app, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("router-tokenizer"))


@pytest.fixture
def fake(tokenizer):
    return FakeShardClient(fixed_script(tokenizer), tokenizer.eos_token_id)


@pytest.fixture
async def router(fake, tokenizer):
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128)
    yield client
    await client.close()
    await ctx.batcher.stop()


@pytest.fixture
def api(router: TestClient) -> AsyncOpenAI:
    return openai_client(router)


def openai_client(client: TestClient) -> AsyncOpenAI:
    """The official OpenAI client against the router on this test client."""
    from openai import AsyncOpenAI  # a dev-only client: GPU runs load this plugin without it

    return AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def shard_socket(tiny_llama_dir: Path, tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("uds") / "shard")
    command = [sys.executable, "-m", "shardline.shards.cli", "serve", str(tiny_llama_dir)]
    command += ["--uds-path", prefix, "--device", "cpu", "--kv-cache-bytes", str(64 << 20)]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    socket = f"{prefix}-0"
    deadline = time.monotonic() + 120
    while not Path(socket).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the shard did not start")
        time.sleep(0.2)
    yield socket
    process.terminate()
    process.wait(timeout=30)


@contextlib.asynccontextmanager
async def open_router(
    shard_socket: str, model_dir: Path, max_total_tokens: int, **more_settings: Any
) -> AsyncIterator[TestClient]:
    """The router app in front of a real shard, on a test client."""
    shards = await ShardedClient.connect(shard_socket)
    settings = RouterSettings(model_id="tiny", max_total_tokens=max_total_tokens, **more_settings)
    ctx = await start_router(shards, AutoTokenizer.from_pretrained(model_dir), settings)
    client = TestClient(RouterTestServer(create_app(ctx), handler_cancellation=True))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await ctx.batcher.stop()
        ctx.validator.close()
        await shards.close()
