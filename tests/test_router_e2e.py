"""The router in front of a real shard process on a tiny model: greedy output equals
transformers' `generate`, streamed and not, alone and 32 at once in shared batches."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardline.router.http import CONTEXT
from shardline.router.request_types import ValidRequest
from shardline.sampling_params import SamplingParams
from tests.router_fixtures import open_router

pytestmark = pytest.mark.slow

PROMPTS = ["the city", "north river cache", "paged attention tensor", "the model server is"]


def _expected(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


async def test_greedy_tokens_equal_transformers(shard_socket, tiny_llama_dir):
    async with open_router(shard_socket, tiny_llama_dir, 256) as client:
        shards = client.app[CONTEXT].client
        expected = {p: _expected(tiny_llama_dir, p, 12) for p in PROMPTS}
        for prompt, ids in expected.items():
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True}}
            answer = await (await client.post("/generate", json=body)).json()
            got = [t["id"] for t in answer["details"]["tokens"]]
            assert got == ids[: len(got)], prompt
        bodies = [
            {
                "inputs": PROMPTS[i % len(PROMPTS)],
                "parameters": {"max_new_tokens": 4 + i % 9, "details": True},
            }
            for i in range(32)
        ]
        answers = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
        for body, answer in zip(bodies, answers, strict=True):
            got = [t["id"] for t in (await answer.json())["details"]["tokens"]]
            want = expected[body["inputs"]][: body["parameters"]["max_new_tokens"]]
            assert got == want[: len(got)]
        metrics = (await (await client.get("/metrics")).read()).decode()
        samples = dict(
            line.rsplit(" ", 1)
            for line in metrics.splitlines()
            if line.startswith("tgi_batch_next")
        )
        batches, requests = (float(samples[f"tgi_batch_next_size_{k}"]) for k in ("count", "sum"))
        assert requests > batches, "no prefill batch held more than one request"
        assert (await shards.stats()).num_sequences == 0


async def test_best_of_and_beam_search_over_generate(shard_socket, tiny_llama_dir):
    """best_of answers TGI's way (highest mean logprob, the rest in best_of_sequences); beam
    search answers with the best beam, equal to transformers', the other beams after it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    async with open_router(shard_socket, tiny_llama_dir, 256, max_best_of=3) as client:
        shards = client.app[CONTEXT].client
        body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 8, "best_of": 3}}
        body["parameters"].update(do_sample=True, temperature=0.9, details=True)
        answer = await (await client.post("/generate", json=body)).json()
        others = answer["details"]["best_of_sequences"]
        assert len(others) == 2 and all(o["seed"] is not None for o in others)
        sequences = [answer["details"], *others]
        means = [sum(t["logprob"] for t in s["tokens"]) / len(s["tokens"]) for s in sequences]
        assert means[0] == max(means)
        beam = {"use_beam_search": True, "beam_width": 3, "max_new_tokens": 6, "details": True}
        body = {"inputs": PROMPTS[2], "parameters": beam}
        answer = await (await client.post("/generate", json=body)).json()
        ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        expected = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
        got = [t["id"] for t in answer["details"]["tokens"]]
        assert got == expected[0, ids.shape[1] :].tolist()[: len(got)]
        assert len(answer["details"]["best_of_sequences"]) == 2
        streamed = await client.post("/generate_stream", json=body)
        assert streamed.status == 422 and "streaming" in (await streamed.json())["error"]
        assert (await shards.stats()).num_sequences == 0
        stats = await shards.stats()
        assert stats.free_blocks == stats.total_blocks


async def _generate(client, prompt: str, **parameters) -> dict:
    body = {"inputs": prompt, "parameters": {"details": True, **parameters}}
    answer = await client.post("/generate", json=body)
    assert answer.status == 200, await answer.text()
    return await answer.json()


def _stop_inside(text: str, avoid: str = "") -> str:
    """A short piece of `text`, from its third character on, found nowhere earlier nor in
    `avoid`: a stop sequence that ends the text there."""
    for start in range(2, len(text) - 3):
        stop = text[start : start + 3]
        if stop.strip() and text.index(stop) == start and stop not in avoid:
            return stop
    pytest.fail(f"no stop sequence fits {text!r}")


async def _sample_texts(batcher, tokenizer, prompt: str, **params) -> list[str]:
    """The texts of two seeded samples of one request, submitted to the batcher directly
    (TGI's HTTP API refuses a seed with best_of)."""
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=12, **params)
    request = ValidRequest(prompt, tokenizer.encode(prompt), params, max_new_tokens=12)
    events = await batcher.submit(request).collect()
    finished = {e.sequence_index: e.finished.generated_text for e in events if e.finished}
    return [finished[0], finished[1]]


async def test_stop_sequences_and_disconnects_end_exactly_and_free_every_block(
    shard_socket, tiny_llama_dir
):
    """The router ends these requests a step after the shard ran them: the extra token must
    reach no one and every KV block must come back."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    async with open_router(shard_socket, tiny_llama_dir, 256) as client:
        ctx = client.app[CONTEXT]
        shards = ctx.client
        full = {p: await _generate(client, p, max_new_tokens=16) for p in PROMPTS}
        stops = {p: _stop_inside(answer["generated_text"]) for p, answer in full.items()}
        long = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 200, "ignore_eos": True}}
        disconnected = [await client.post("/generate_stream", json=long) for _ in range(3)]
        stopped = await asyncio.gather(
            *(_generate(client, p, max_new_tokens=16, stop=[stops[p]]) for p in PROMPTS)
        )
        for answer in disconnected:
            await answer.content.readuntil(b"\n\n")
            answer.close()
        for prompt, answer in zip(PROMPTS, stopped, strict=True):
            text = full[prompt]["generated_text"]
            cut = text.index(stops[prompt])
            tokens = full[prompt]["details"]["tokens"]
            ids, pieces = [t["id"] for t in tokens], [t["text"] for t in tokens]
            needed = next(n for n in range(1, 17) if stops[prompt] in "".join(pieces[:n]))
            assert answer["generated_text"] == text[: cut + len(stops[prompt])]  # TGI keeps it
            assert [t["id"] for t in answer["details"]["tokens"]] == ids[:needed]
            assert answer["details"]["finish_reason"] == "stop_sequence"

        samples = await _sample_texts(ctx.batcher, tokenizer, PROMPTS[1])
        stop = _stop_inside(samples[0], avoid=samples[1])
        one_stopped = await _sample_texts(ctx.batcher, tokenizer, PROMPTS[1], stop=[stop])
        assert one_stopped == [samples[0][: samples[0].index(stop)], samples[1]]

        deadline = time.monotonic() + 10
        while (stats := await shards.stats()).free_blocks != stats.total_blocks:
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.02)
        assert stats.num_sequences == 0 and ctx.batcher.running_size == 0


async def test_prompts_over_the_prefill_budget_are_chunked(shard_socket, tiny_llama_dir):
    """A 6-token prefill budget: prompts of 10-30 tokens are prefilled a chunk a step (beside
    the requests already decoding) and still give transformers' greedy tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    async with open_router(
        shard_socket, tiny_llama_dir, 256, max_input_tokens=200, max_batch_prefill_tokens=6
    ) as client:
        shards = client.app[CONTEXT].client
        prompts = [" ".join(PROMPTS[: 1 + i % 4]) * (1 + i % 3) for i in range(8)]
        assert max(len(tokenizer(p).input_ids) for p in prompts) > 6
        bodies = [
            {"inputs": p, "parameters": {"max_new_tokens": 6, "details": True}} for p in prompts
        ]
        answers = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
        for prompt, answer in zip(prompts, answers, strict=True):
            got = [t["id"] for t in (await answer.json())["details"]["tokens"]]
            want = _expected(tiny_llama_dir, prompt, 6)
            assert got == want[: len(got)], prompt
        stats = await shards.stats()
        assert stats.num_sequences == 0 and stats.free_blocks == stats.total_blocks
