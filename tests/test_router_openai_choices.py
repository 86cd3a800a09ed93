"""Several choices and the legacy completion extras through the official `openai` client:
`n` samples per prompt on both routes (over a real shard on the tiny model: each sample is a
sequence of one request), `echo` and `logprobs` on /v1/completions (over the recording fake
shard, whose logprobs are known), streamed and not."""

from __future__ import annotations

from collections import defaultdict

import jsonschema
import pytest
from transformers import AutoTokenizer

from shardline.router.http import CONTEXT
from tests.fake_shard import CONTINUATION
from tests.openai_route_helpers import USER, post_stream, templated
from tests.router_assertions import _as_json_schema, assert_schema
from tests.router_fixtures import open_router, openai_client

PROMPT = "the city"


# ---- echo and logprobs (fake shard) ------------------------------------------------------------


def _generated(tokenizer, count: int) -> list[str]:
    ids = tokenizer.encode(CONTINUATION, add_special_tokens=False)[:count]
    return [tokenizer.decode(ids[: i + 1])[len(tokenizer.decode(ids[:i])) :] for i in range(count)]


async def test_logprobs_are_openai_legacy_shape(api, fake, tokenizer):
    answer = await api.completions.create(model="m", prompt=PROMPT, logprobs=2, max_tokens=4)
    choice = answer.choices[0]
    assert fake.requests[-1].top_n_tokens == 2 and not fake.requests[-1].decoder_input_details
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text == "".join(_generated(tokenizer, 4))
    assert logprobs.token_logprobs == [-0.5] * 4
    ids = tokenizer.encode(CONTINUATION, add_special_tokens=False)[:4]
    for top, token, token_id in zip(logprobs.top_logprobs, logprobs.tokens, ids, strict=True):
        # the fake's alternatives: the token itself and the next id, each at -0.5
        assert top == {token: -0.5, tokenizer.decode([token_id + 1]): -0.5}
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]
    assert logprobs.text_offset == offsets


async def test_echo_returns_the_prompt_and_its_logprobs(api, fake, tokenizer):
    plain = await api.completions.create(model="m", prompt=PROMPT, echo=True, max_tokens=3)
    assert plain.choices[0].text == PROMPT + "".join(_generated(tokenizer, 3))
    assert plain.choices[0].logprobs is None and not fake.requests[-1].decoder_input_details
    answer = await api.completions.create(
        model="m", prompt=PROMPT, echo=True, logprobs=1, max_tokens=3
    )
    assert fake.requests[-1].decoder_input_details
    prompt_ids = tokenizer.encode(PROMPT)
    logprobs = answer.choices[0].logprobs
    assert answer.choices[0].text == plain.choices[0].text
    assert len(logprobs.tokens) == len(prompt_ids) + 3
    assert logprobs.tokens[: len(prompt_ids)] == [tokenizer.decode([i]) for i in prompt_ids]
    # the first prompt token has no logprob; the fake scores the others -1.0
    assert logprobs.token_logprobs == [None] + [-1.0] * (len(prompt_ids) - 1) + [-0.5] * 3
    assert logprobs.top_logprobs[0] is None
    assert logprobs.top_logprobs[1] == {logprobs.tokens[1]: -1.0}
    # offsets run over the prompt's tokens, then the completion's from the prompt's end
    assert logprobs.text_offset[len(prompt_ids)] == len(PROMPT)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert answer.usage.prompt_tokens == len(prompt_ids) and answer.usage.completion_tokens == 3


async def test_echo_with_logprobs_streams_the_same_choice(api, router, tokenizer):
    options = {"model": "m", "prompt": [PROMPT, "a"], "echo": True, "logprobs": 1}
    whole = await api.completions.create(**options, max_tokens=5)
    stream = await api.completions.create(**options, max_tokens=5, stream=True)
    texts: dict[int, str] = defaultdict(str)
    logprobs: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    async for chunk in stream:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            logprobs[choice.index][name] += getattr(choice.logprobs, name)
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert choice.text.startswith((PROMPT, "a")[choice.index])
        assert logprobs[choice.index] == choice.logprobs.model_dump()
    body = {**options, "max_tokens": 2, "stream": True}
    for chunk in await post_stream(router, "/v1/completions", body):
        assert_schema(
            {**chunk, "choices": [{**c, "logprobs": None} for c in chunk["choices"]]}, "Chunk"
        )


# ---- n samples per prompt (real shard) ---------------------------------------------------------


@pytest.fixture
async def real_api(shard_socket, tiny_llama_dir):
    async with open_router(
        shard_socket, tiny_llama_dir, max_total_tokens=256, max_best_of=3
    ) as client:
        yield openai_client(client), client


async def test_chat_n_samples_are_choices_streamed_and_not(real_api, tiny_llama_dir):
    api, client = real_api
    options = {"model": "tiny", "messages": USER, "n": 3, "seed": 5, "max_tokens": 10}
    answer = await api.chat.completions.create(**options, logprobs=True)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in answer.choices]
    assert len(set(texts)) > 1, texts  # the samples differ (seed + sample index)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt_ids = tokenizer(templated(tokenizer, USER), add_special_tokens=False).input_ids
    assert answer.usage.prompt_tokens == len(prompt_ids)  # once, whatever n
    generated = [len(choice.logprobs.content) for choice in answer.choices]
    assert answer.usage.completion_tokens == sum(generated)
    stream = await api.chat.completions.create(
        **options, stream=True, stream_options={"include_usage": True}
    )
    streamed: dict[int, str] = defaultdict(str)
    reasons: dict[int, list] = defaultdict(list)
    chunks = [chunk async for chunk in stream]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        streamed[choice.index] += choice.delta.content
        reasons[choice.index].append(choice.finish_reason)
    assert [streamed[i] for i in range(3)] == texts  # same seed, same samples
    assert all(r[-1] in ("stop", "length") and set(r[:-1]) <= {None} for r in reasons.values())
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
        answer.usage.total_tokens,
    )
    # The prompt's second asking finds its full blocks in the shard's prefix cache.
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert (await client.app[CONTEXT].client.stats()).num_sequences == 0


async def test_completion_n_numbers_choices_prompt_by_prompt(real_api):
    api, _ = real_api
    options = {"model": "tiny", "prompt": ["the city", "north river"], "n": 2, "max_tokens": 6}
    answer = await api.completions.create(**options, seed=3)
    assert [choice.index for choice in answer.choices] == [0, 1, 2, 3]
    stream = await api.completions.create(**options, seed=3, stream=True)
    texts: dict[int, str] = defaultdict(str)
    async for chunk in stream:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert [texts[i] for i in range(4)] == [choice.text for choice in answer.choices]
    echoed = await api.completions.create(**options, seed=3, echo=True)
    assert [c.text for c in echoed.choices] == [
        prompt + choice.text
        for prompt, choice in zip(
            ["the city"] * 2 + ["north river"] * 2, answer.choices, strict=True
        )
    ]


async def test_the_served_spec_describes_legacy_logprobs(router):
    spec = await (await router.get("/openapi.json")).json()
    schema = {
        "$ref": "#/components/schemas/CompletionFinal",
        "components": _as_json_schema(spec["components"]),
    }
    body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 3}
    jsonschema.validate(await (await router.post("/v1/completions", json=body)).json(), schema)


async def test_completion_best_of_answers_the_n_best_samples(real_api):
    """best_of 3, n 2 draws the same seeded samples as n 3 and answers the two of highest mean
    logprob per token, best first; all three are billed, as OpenAI bills them."""
    api, _ = real_api
    options = {"model": "tiny", "prompt": "the city", "max_tokens": 6, "seed": 9, "logprobs": 0}
    every = await api.completions.create(**options, n=3)
    best = await api.completions.create(**options, n=2, best_of=3)

    def mean(choice) -> float:
        return sum(choice.logprobs.token_logprobs) / len(choice.logprobs.token_logprobs)

    ranked = sorted(every.choices, key=mean, reverse=True)[:2]
    assert ranked != every.choices[:2]  # the ranking matters for this seed
    assert [c.text for c in best.choices] == [c.text for c in ranked]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == every.usage.completion_tokens
