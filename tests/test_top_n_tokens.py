"""`top_n_tokens` through `/generate` on a real shard: the alternatives listed are tokens the
sampler could have picked, never ones top-k filtered out."""

from __future__ import annotations

import math

import pytest

from tests.router_fixtures import open_router


@pytest.fixture
async def router(shard_socket, tiny_llama_dir):
    async with open_router(shard_socket, tiny_llama_dir, max_total_tokens=256) as client:
        yield client


async def _details(router, **parameters) -> dict:
    parameters = {"max_new_tokens": 5, "details": True, "top_n_tokens": 4, **parameters}
    response = await router.post("/generate", json={"inputs": "the city", "parameters": parameters})
    assert response.status == 200, await response.text()
    return (await response.json())["details"]


async def test_top_n_tokens_leave_out_what_top_k_filtered(router):
    details = await _details(router, do_sample=True, top_k=2, seed=5)
    assert len(details["top_tokens"]) == len(details["tokens"]) == 5
    for token, alternatives in zip(details["tokens"], details["top_tokens"], strict=True):
        assert len(alternatives) == 2  # top_k=2 leaves two tokens to pick from, not four
        assert token["id"] in {alternative["id"] for alternative in alternatives}
        assert all(math.isfinite(alternative["logprob"]) for alternative in alternatives)


async def test_top_n_tokens_list_n_tokens_when_nothing_filters(router):
    details = await _details(router, do_sample=False)
    assert [len(alternatives) for alternatives in details["top_tokens"]] == [4] * 5
