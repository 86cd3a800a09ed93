"""OpenAI-compatible routes over a fake shard with the official `openai` client: chat and text
completions, streaming, parameters, logprobs, models, tokenize, invocations, the OpenAPI
document, and one greedy chat on a real shard."""

from __future__ import annotations

import asyncio

import jsonschema
import pytest
from openai import OpenAI

from shardline.router.http import CONTEXT
from tests.fake_shard import CONTINUATION
from tests.openai_route_helpers import USER, post_stream, templated
from tests.router_assertions import TGI_SPEC, _as_json_schema, assert_schema
from tests.router_fixtures import open_router, openai_client


async def test_chat_completion_with_the_official_client(api, router, fake, tokenizer):
    answer = await api.chat.completions.create(model="anything", messages=USER)
    choice = answer.choices[0]
    assert choice.message.content == CONTINUATION and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and answer.model == "tiny"
    prompt = templated(tokenizer, USER)
    assert prompt == "<|im_start|>user\nthe city<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert list(fake.requests[-1].input_ids) == prompt_ids
    generated = len(tokenizer.encode(CONTINUATION, add_special_tokens=False)) + 1
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), generated)
    assert usage.total_tokens == len(prompt_ids) + generated
    raw = await (await router.post("/v1/chat/completions", json={"messages": USER})).json()
    assert_schema(raw, "ChatCompletion")
    assert raw["object"] == "chat.completion" and raw["choices"][0]["logprobs"] is None


async def test_the_sync_client_works_unchanged(router):
    client = OpenAI(base_url=str(router.make_url("/v1")), api_key="x", max_retries=0)
    answer = await asyncio.to_thread(
        client.chat.completions.create, model="m", messages=USER, max_tokens=2
    )
    assert answer.choices[0].finish_reason == "length"
    stream = await asyncio.to_thread(
        lambda: list(client.completions.create(model="m", prompt="a", stream=True))
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == CONTINUATION


async def test_chat_stream_with_usage(api, router, tokenizer):
    stream = await api.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert "".join(c.choices[0].delta.content for c in with_choices) == CONTINUATION
    assert [c.choices[0].finish_reason for c in with_choices][-2:] == [None, "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(with_choices)
    assert all(chunk.usage is None for chunk in with_choices)
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    for chunk in await post_stream(router, "/v1/chat/completions", body):
        assert_schema(chunk, "ChatCompletionChunk")
        assert chunk["object"] == "chat.completion.chunk"
    plain = await post_stream(router, "/v1/chat/completions", {"messages": USER, "stream": True})
    assert all("usage" not in chunk and chunk["choices"] for chunk in plain)


async def test_content_parts_and_roles_go_through_the_template(api, fake, tokenizer):
    parts = [{"type": "text", "text": "the "}, {"type": "text", "text": "city"}]
    history = [{"role": "assistant", "content": "Paris"}, {"role": "user", "content": "river"}]
    system = {"role": "system", "content": "be brief"}
    messages = [system, {"role": "user", "content": parts}, *history]
    await api.chat.completions.create(model="m", messages=messages, max_tokens=2)
    flat = [system, *USER, *history]
    expected = tokenizer.encode(templated(tokenizer, flat), add_special_tokens=False)
    assert list(fake.requests[-1].input_ids) == expected


async def test_parameters_reach_the_shard(api, fake):
    answer = await api.chat.completions.create(
        model="m",
        messages=USER,
        max_tokens=3,
        temperature=0.5,
        top_p=0.9,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        seed=11,
        stop="never",
        extra_body={
            "top_k": 7,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "min_tokens": 2,
            "ignore_eos": True,
            "stop_token_ids": [5],
        },
    )
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
    chooser = fake.requests[-1].parameters
    stopping = fake.requests[-1].stopping_parameters
    assert chooser.do_sample and chooser.temperature == pytest.approx(0.5)
    assert (chooser.top_k, chooser.seed) == (7, 11)
    assert (chooser.top_p, chooser.min_p) == (pytest.approx(0.9), pytest.approx(0.1))
    assert chooser.repetition_penalty == pytest.approx(1.2)
    assert (chooser.frequency_penalty, chooser.presence_penalty) == (0.5, -0.5)
    assert stopping.max_new_tokens == 3 and stopping.min_new_tokens == 2
    assert list(stopping.stop_token_ids) == [5]  # stop strings stay in the router (below)
    assert stopping.ignore_eos_token
    greedy = await api.chat.completions.create(
        model="m", messages=USER, temperature=0, max_completion_tokens=40, stop=["naïve", "x"]
    )
    assert not fake.requests[-1].parameters.do_sample
    assert greedy.choices[0].message.content == " the café "
    assert greedy.choices[0].finish_reason == "stop"


async def test_logprobs(api, router):
    answer = await api.chat.completions.create(
        model="m", messages=USER, logprobs=True, top_logprobs=2
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(entry.logprob == -0.5 and len(entry.top_logprobs) == 2 for entry in content)
    body = {"messages": USER, "logprobs": True, "top_logprobs": 2}
    assert_schema(
        await (await router.post("/v1/chat/completions", json=body)).json(), "ChatCompletion"
    )
    chunks = await post_stream(router, "/v1/chat/completions", {**body, "stream": True})
    for chunk in chunks:
        assert_schema(chunk, "ChatCompletionChunk")
        assert len(chunk["choices"][0]["logprobs"]["content"]) == 1


async def test_completions(api, router, fake, tokenizer):
    answer = await api.completions.create(model="m", prompt="the city")
    assert answer.choices[0].text == CONTINUATION and answer.choices[0].finish_reason == "stop"
    assert list(fake.requests[-1].input_ids) == tokenizer.encode("the city")
    several = await api.completions.create(model="m", prompt=["a", "the city"], max_tokens=2)
    assert [c.index for c in several.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in several.choices)
    assert several.usage.completion_tokens == 4
    assert several.usage.prompt_tokens == 1 + len(tokenizer.encode("the city"))
    raw = await (await router.post("/v1/completions", json={"prompt": ["a", "b"]})).json()
    assert_schema(raw, "CompletionFinal")
    assert raw["object"] == "text_completion"


async def test_completion_streams_interleave_choices(api, router):
    stream = await api.completions.create(
        model="m", prompt=["a", "b"], stream=True, stream_options={"include_usage": True}
    )
    texts = {0: "", 1: ""}
    chunks = [chunk async for chunk in stream]
    for chunk in chunks[:-1]:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == {0: CONTINUATION, 1: CONTINUATION}
    assert chunks[-1].usage.completion_tokens == len(chunks) - 1
    raw = await post_stream(router, "/v1/completions", {"prompt": "a", "stream": True})
    for chunk in raw:
        assert_schema(chunk, "Chunk")
    assert [c["choices"][0]["finish_reason"] for c in raw][-2:] == ["", "stop"]


async def test_models_and_chat_tokenize(api, router, tokenizer):
    listed = await api.models.list()
    assert [model.id for model in listed.data] == ["tiny"]
    raw = await (await router.get("/v1/models")).json()
    assert raw["object"] == "list"
    assert_schema(raw["data"][0], "ModelInfo")
    answer = await router.post("/chat_tokenize", json={"messages": USER, "model": "tgi"})
    body = await answer.json()
    assert_schema(body, "ChatTokenizeResponse")
    assert body["templated_text"] == templated(tokenizer, USER)
    ids = [token["id"] for token in body["tokenize_response"]]
    assert ids == tokenizer.encode(body["templated_text"], add_special_tokens=False)
    assert "".join(t["text"] for t in body["tokenize_response"]) == body["templated_text"]


async def test_invocations_dispatch_on_the_body(router):
    chat = await (await router.post("/invocations", json={"messages": USER})).json()
    assert_schema(chat, "SagemakerResponse")
    assert chat["choices"][0]["message"]["content"] == CONTINUATION
    completion = await (await router.post("/invocations", json={"prompt": "a"})).json()
    assert_schema(completion, "CompletionFinal")
    assert completion["choices"][0]["text"] == CONTINUATION
    generated = await (await router.post("/invocations", json={"inputs": "a"})).json()
    assert generated[0]["generated_text"] == CONTINUATION
    chunks = await post_stream(router, "/invocations", {"messages": USER, "stream": True})
    for chunk in chunks:
        assert_schema(chunk, "SagemakerStreamResponse")


async def test_openapi_describes_the_openai_routes(router):
    ours = await (await router.get("/openapi.json")).json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/chat_tokenize"):
        assert set(ours["paths"][path]) == set(TGI_SPEC["paths"][path]), path
    invocations = ours["paths"]["/invocations"]["post"]["requestBody"]["content"]
    assert invocations["application/json"]["schema"]["$ref"].endswith("/SagemakerRequest")
    theirs = TGI_SPEC["components"]["schemas"]
    for name in ("ChatRequest", "CompletionRequest", "ChatCompletion", "ChatCompletionChunk"):
        schema = ours["components"]["schemas"][name]
        assert set(schema["required"]) == set(theirs[name]["required"]), name
        assert set(theirs[name]["properties"]) <= set(schema["properties"]), name
    components = _as_json_schema(ours["components"])
    chat = await (await router.post("/v1/chat/completions", json={"messages": USER})).json()
    chunks = await post_stream(router, "/v1/completions", {"prompt": "a", "stream": True})
    for instance, name in ((chat, "ChatCompletion"), (chunks[0], "Chunk"), (chunks[-1], "Chunk")):
        schema = {"$ref": f"#/components/schemas/{name}", "components": components}
        jsonschema.validate(instance, schema)


@pytest.mark.slow
async def test_chat_greedy_equals_transformers_on_a_real_shard(shard_socket, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    async with open_router(shard_socket, tiny_llama_dir, max_total_tokens=256) as client:
        api = openai_client(client)
        for messages in (USER, [{"role": "system", "content": "paged"}, *USER]):
            prompt = templated(tokenizer, messages)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
            answer = await api.chat.completions.create(
                model="tiny", messages=messages, temperature=0, max_tokens=12
            )
            assert answer.usage.prompt_tokens == ids.shape[1]
            assert answer.usage.completion_tokens == len(out)
            want = tokenizer.decode(out, skip_special_tokens=True)
            assert answer.choices[0].message.content == want
        assert (await client.app[CONTEXT].client.stats()).num_sequences == 0


async def test_unknown_chat_fields_are_ignored_as_tgi_does(router):
    answer = await router.post("/v1/chat/completions", json={"messages": USER, "temprature": 0.5})
    assert answer.status == 200, await answer.text()
