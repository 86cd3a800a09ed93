"""Prefix caching seen from the router: its prefill budget counts only the tokens the shards must
compute, and through HTTP on the real tiny-model shard the OpenAI usage reports the cached
tokens, the metrics count them, cache_salt isolates tenants and chat turns reuse their history."""

from __future__ import annotations

import asyncio
import re

import pytest

from shardline.router.metrics import RouterMetrics
from shardline.router.prefix_view import PrefixCacheView
from shardline.router.queue import Entry
from shardline.router.request_types import ValidRequest
from shardline.sampling_params import SamplingParams
from tests.batcher_helpers import _batcher, _counting_script
from tests.fake_shard import FakeShardClient
from tests.router_fixtures import open_router, openai_client

SHARD_BLOCK = 16  # the shard_socket fixture's block size (ShardConfig's default)
# ~100 tokens of the tiny tokenizer: six full blocks of a common prefix.
SYSTEM = " ".join(f"rule {i}: answer briefly and politely." for i in range(12))


def _ids_request(ids: list[int], salt: str | None = None) -> ValidRequest:
    params = SamplingParams(temperature=0.0, cache_salt=salt)
    return ValidRequest(inputs="", input_ids=ids, params=params, max_new_tokens=3)


async def test_the_prefill_budget_counts_only_the_tokens_left_to_compute(tokenizer):
    """After a 32-token prompt was prefilled, two prompts that extend it by 4 tokens each
    (8 blocks of 4 cached, 4 to compute) fit one prefill of 16 tokens together; under another
    salt nothing is expected cached, and they go one by one."""
    fake = FakeShardClient(_counting_script, tokenizer.eos_token_id)
    config = {"block_size": 4, "max_batch_prefill_tokens": 40, "prefix_caching": True}
    batcher = _batcher(tokenizer, fake, **config)
    common = list(range(20, 52))
    await batcher.submit(_ids_request(common)).collect()
    for salt, together in ((None, True), ("other", False)):
        fake.calls.clear()
        tails = ([60, 61, 62, 63], [70, 71, 72, 73])
        requests = [_ids_request(common + tail, salt) for tail in tails]
        await asyncio.gather(*(batcher.submit(r).collect() for r in requests))
        sizes = [len(call[2]) for call in fake.calls_of("prefill")]
        assert sizes == ([2] if together else [1, 1])
    await batcher.stop()


def test_the_view_follows_what_the_shards_report():
    """The view expects what it saw prefilled, believes the shards over itself (a chain they
    found shorter is dropped), and keeps at most its capacity, least recently used first."""
    metrics = RouterMetrics()
    view = PrefixCacheView(block_size=4, capacity=6, metrics=metrics)

    def entry(ids: list[int], prefilled: int = 0) -> Entry:
        new = Entry(id=0, request=_ids_request(ids), sequences=[])
        new.prefilled = prefilled
        return new

    first = list(range(10, 30))  # five full blocks
    view.answered(entry(first, prefilled=20), found_tokens=0)
    assert (metrics.prefix_cache_queries.value(), metrics.prefix_cache_hits.value()) == (20, 0)
    again = entry(first + [1, 2])
    view.expect(again)
    assert again.cached == 20
    again.prefilled = 22
    view.answered(again, found_tokens=8)  # the shards had evicted all but two blocks
    assert again.cached == 8 and metrics.prefix_cache_hits.value() == 8
    third = entry(first + [3])
    view.expect(third)
    assert third.cached == 20  # the second prompt's prefill put them back
    view.answered(entry(list(range(50, 70)), prefilled=20), found_tokens=None)
    view.expect(third)
    assert third.cached == 4  # six blocks at most: the older chain lost its tail


@pytest.fixture
async def api_client(shard_socket, tiny_llama_dir):
    async with open_router(shard_socket, tiny_llama_dir, max_total_tokens=512) as client:
        yield client


async def _complete(api, prompt: str, **extra) -> tuple[str, int]:
    answer = await api.completions.create(
        model="tiny", prompt=prompt, max_tokens=8, temperature=0, extra_body=extra
    )
    return answer.choices[0].text, answer.usage.prompt_tokens_details.cached_tokens


async def test_completions_report_cached_tokens_and_answer_as_a_cold_run(api_client):
    api = openai_client(api_client)
    cold_text, cold_cached = await _complete(api, SYSTEM + " Question: why?", cache_salt="cold")
    assert cold_cached == 0
    await _complete(api, SYSTEM + " Question: what?")
    text, cached = await _complete(api, SYSTEM + " Question: why?")
    assert cached >= 3 * SHARD_BLOCK and cached % SHARD_BLOCK == 0
    assert text == cold_text
    metrics = await (await api_client.get("/metrics")).text()
    queries = float(re.search(r"^tgi_prefix_cache_queries (\S+)$", metrics, re.M).group(1))
    hits = float(re.search(r"^tgi_prefix_cache_hits (\S+)$", metrics, re.M).group(1))
    assert hits >= cached and queries > hits
    indexed = float(re.search(r"^shardline_kv_blocks_cached (\S+)$", metrics, re.M).group(1))
    assert indexed >= 3


async def test_salts_never_share_and_the_same_salt_does(api_client):
    api = openai_client(api_client)
    prompt = SYSTEM + " Tenant question."
    assert (await _complete(api, prompt, cache_salt="a"))[1] == 0
    assert (await _complete(api, prompt, cache_salt="b"))[1] == 0
    assert (await _complete(api, prompt))[1] == 0
    assert (await _complete(api, prompt, cache_salt="a"))[1] > 0
    tgi = await api_client.post(
        "/generate", json={"inputs": prompt, "parameters": {"cache_salt": "b", "max_new_tokens": 2}}
    )
    assert tgi.status == 200


async def test_chat_turns_reuse_the_history(api_client):
    api = openai_client(api_client)
    messages = [{"role": "system", "content": SYSTEM}]
    previous_prompt = 0
    for turn in range(3):
        messages.append({"role": "user", "content": f"Turn {turn}: tell me more."})
        answer = await api.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0
        )
        usage = answer.usage
        assert usage.prompt_tokens > 3 * SHARD_BLOCK
        if turn:  # the last turn's prompt, up to its last full block but one, was found
            assert (
                usage.prompt_tokens_details.cached_tokens
                >= (previous_prompt // SHARD_BLOCK - 1) * SHARD_BLOCK
            )
        previous_prompt = usage.prompt_tokens
        reply = answer.choices[0].message.content
        messages.append({"role": "assistant", "content": reply or "ok"})
