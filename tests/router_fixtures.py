"""The router app over a deterministic fake shard, on a test client: `router`, `fake`, `tokenizer`.

Loaded for every test module by conftest.py; a module may define its own fixtures of these names.
"""

from __future__ import annotations

import pytest

from tests.test_router_fakes import FakeShardClient, fixed_script, router_client, tiny_tokenizer


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
