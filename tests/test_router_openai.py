"""TGI's OpenAI-compatible routes over a fake shard: the official `openai` client unchanged,
bodies and chunks validated against TGI's schemas, the chat template, parameters, errors."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from openai import OpenAI

from shardline.router.http import CONTEXT
from tests.fake_shard import CONTINUATION, FakeShardClient, fixed_script, router_client
from tests.fake_shard import tiny_tokenizer as build_tokenizer
from tests.router_assertions import (
    TGI_SPEC,
    _as_json_schema,
    assert_error,
    assert_refused,
    assert_schema,
)
from tests.router_fixtures import open_router, openai_client

USER = [{"role": "user", "content": "the city"}]


def templated(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sse_payloads(raw: bytes) -> list:
    chunks = raw.decode().split("\n\n")
    assert chunks[-1] == "" and all(chunk.startswith("data:") for chunk in chunks[:-1])
    return [chunk[len("data:") :].strip() for chunk in chunks[:-1]]


async def post_stream(router, path: str, body: dict) -> list[dict]:
    answer = await router.post(path, json=body)
    assert answer.status == 200 and answer.headers["Content-Type"] == "text/event-stream"
    payloads = sse_payloads(await answer.read())
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


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


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"n": 3}, "`n` must be > 0 and <= 2 (--max-best-of)"),
        ({"n": 2, "temperature": 0}, "`n` must be 1 with greedy sampling"),
        ({"response_format": {"type": "xml"}}, "`response_format` must be an object"),
        ({"response_format": {"type": "json_schema"}}, 'needs {"schema"'),
        ({"temperature": -1}, "`temperature` must be >= 0"),
        ({"temperature": "hot"}, "`temperature` must be a finite number"),
        ({"top_p": 0}, "`top_p` must be in (0, 1]"),
        ({"max_tokens": 0}, "`max_tokens` must be in [1, 4294967295]"),
        ({"max_tokens": 500}, "`inputs` tokens + `max_new_tokens` must be <= 128"),
        ({"frequency_penalty": 3}, "`frequency_penalty` must be in [-2, 2]"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences"),
        ({"seed": -2}, "`seed` must be in [0,"),
        ({"top_logprobs": 2}, "`top_logprobs` requires `logprobs` to be true"),
        ({"logprobs": True, "top_logprobs": 6}, "`top_logprobs` must be >= 0 and <= 5"),
        ({"min_tokens": 9, "max_tokens": 2}, "`min_tokens` must be <= max_tokens"),
        ({"ignore_eos": "yes"}, "`ignore_eos` must be a boolean"),
        ({"stream_options": {"include_usage": True}}, "only allowed when `stream` is true"),
        ({"messages": []}, "`messages` is required"),
        ({"messages": [{"content": "hi"}]}, "`messages[0]`.role is required"),
        ({"messages": [{"role": "user", "content": 5}]}, "must be a string or a list"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "images are not supported",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]},
            '`messages[0]`.tool_calls[0] must be {"id": ...',
        ),
    ],
)
async def test_chat_validation_errors(router, fake, body, message):
    answer = await router.post("/v1/chat/completions", json={"messages": USER, **body})
    await assert_refused(answer, "validation", message, fake)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"echo": 1}, "`echo` must be a boolean"),
        ({"suffix": "end"}, "`suffix` is not supported"),
        ({"logprobs": 6}, "`logprobs` must be >= 0 and <= 5"),
        ({"logprobs": True}, "`logprobs` must be >= 0 and <= 5"),
        ({"best_of": 3}, "`best_of` must be > 0 and <= 2 (--max-best-of)"),
        ({"best_of": 2, "stream": True}, "`best_of` > `n` is not supported when streaming"),
        ({"best_of": 1, "n": 2}, "`best_of` must be in [2,"),
        ({"n": 3}, "`n` must be > 0 and <= 2"),
        ({"prompt": [1, 2]}, "must be a string or a list of strings"),
        ({"prompt": ["a"] * 5}, "between 1 and 4 prompts"),
        ({"prompt": ""}, "`inputs` cannot be empty"),
    ],
)
async def test_completion_validation_errors(router, fake, body, message):
    answer = await router.post("/v1/completions", json={"prompt": "a", **body})
    await assert_refused(answer, "validation", message, fake)


_CHAT = (
    "/v1/chat/completions",
    lambda text: {"messages": [{"role": "user", "content": text}]},
    lambda choice: choice["message"]["content"],
)
_COMPLETION = ("/v1/completions", lambda text: {"prompt": text}, lambda choice: choice["text"])


@pytest.mark.parametrize(
    ("path", "body", "text_of"), [_CHAT, _COMPLETION], ids=["chat", "completion"]
)
async def test_out_of_vocabulary_prompt_is_422_and_spares_the_others(
    tokenizer, path, body, text_of
):
    last_id = len(tokenizer) - 1  # the tokenizer knows one token more than the model
    fake = FakeShardClient(fixed_script(tokenizer), tokenizer.eos_token_id, vocab_size=last_id)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128)
    try:
        refused, answered = await asyncio.gather(
            client.post(path, json=body("the" + tokenizer.decode([last_id]))),
            client.post(path, json=body("the city")),
        )
        error = await refused.json()
        assert refused.status == 422, error
        assert_error(error, "validation")
        assert f"token id {last_id}, outside the model's vocabulary" in error["error"]
        assert answered.status == 200
        assert text_of((await answered.json())["choices"][0]) == CONTINUATION
        assert len(fake.requests) == 1
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_the_official_client_raises_on_errors(api):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await api.chat.completions.create(model="m", messages=USER, n=3)
    assert "`n` must be > 0" in caught.value.body  # TGI's error JSON: `error` is the message


async def test_template_error_is_422(tmp_path, fake):
    tokenizer = build_tokenizer(tmp_path)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128)
    try:
        for path in ("/v1/chat/completions", "/chat_tokenize"):
            answer = await client.post(path, json={"messages": USER})
            error = await answer.json()
            assert answer.status == 422
            assert_error(error, "template_error")
            assert "roles must alternate" in error["error"]
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_generation_errors_and_metrics(router, fake):
    fake.fail_on = "prefill"
    answer = await router.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    assert answer.status == 424
    assert_error(await answer.json(), "generation")
    fake.fail_on = "decode"
    body = {"messages": USER, "stream": True}
    answer = await router.post("/v1/chat/completions", json=body)
    payloads = sse_payloads(await answer.read())
    assert answer.status == 200 and "[DONE]" not in payloads
    assert_schema(json.loads(payloads[0]), "ChatCompletionChunk")
    assert_error(json.loads(payloads[-1]), "generation")
    fake.fail_on = None
    assert (await router.post("/v1/chat/completions", json={"messages": USER})).status == 200
    await router.post("/v1/completions", json={"prompt": "a", "n": 3})
    text = (await (await router.get("/metrics")).read()).decode()
    for sample in (
        "tgi_request_count 4.0",
        "tgi_request_success 1.0",
        'tgi_request_failure{err="generation"} 2.0',
        'tgi_request_failure{err="validation"} 1.0',
        "tgi_request_validation_duration_count 3.0",
    ):
        assert sample in text, sample


async def test_disconnect_mid_stream_frees_every_sequence(tokenizer):
    script = lambda prompt: [tokenizer.encode("the")[0]] * 500  # noqa: E731
    fake = FakeShardClient(script, tokenizer.eos_token_id, step_delay=0.01)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=1024)
    try:
        body = {"prompt": ["a", "b"], "stream": True}
        answer = await client.post("/v1/completions", json=body)
        await answer.content.readuntil(b"\n\n")
        answer.close()
        for _ in range(200):
            if fake.num_sequences == 0 and ctx.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert fake.num_sequences == 0 and ctx.batcher.running_size == 0 and ctx.in_flight == 0
    finally:
        await client.close()
        await ctx.batcher.stop()


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
