"""OpenAI-compatible routes over a fake shard: validation, template and generation errors in TGI's
error JSON, the official client's exceptions, metrics and disconnects mid-stream."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.fake_shard import CONTINUATION, FakeShardClient, fixed_script, router_client
from tests.fake_shard import tiny_tokenizer as build_tokenizer
from tests.openai_route_helpers import USER, sse_payloads
from tests.router_assertions import assert_error, assert_refused, assert_schema


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
