"""TGI's REST API over a fake shard: validation errors and status codes in TGI's error JSON,
429, disconnects, generation errors and the API key."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_shard import CONTINUATION, FakeShardClient, fixed_script, router_client
from tests.router_assertions import _sse_events, assert_error, assert_schema


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"temperature": "hot"}, "`temperature` must be a finite number"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"presence_penalty": -2.5}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1.5}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"min_p": 2}, "`min_p` must be >= 0.0 and <= 1.0"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"max_new_tokens": 500}, "`inputs` tokens + `max_new_tokens` must be <= 128"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"stop": "a"}, "`stop` must be list[str]"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 127"),
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"use_beam_search": True, "beam_width": 3}, "`beam_width` must be > 0 and <= 2"),
        ({"use_beam_search": True, "beam_width": 2, "stop": ["x"]}, "not supported with beam"),
        ({"seed": -1}, "`seed` must be >= 0"),
        ({"watermark": "yes"}, "`watermark` must be bool"),
        ({"grammar": {"type": "regex", "value": "(a"}}, "`guided_regex` does not compile"),
        ({"grammar": {"type": "json", "value": {"type": "bogus"}}}, "not a usable JSON schema"),
        ({"grammar": {"type": "xml", "value": "a"}}, "`grammar` must be an object whose `type`"),
        ({"grammar": {"type": "json_schema", "value": {}}}, 'needs {"schema"'),
        (
            {"grammar": {"type": "regex", "value": "a+"}, "use_beam_search": True, "beam_width": 2},
            "cannot take a grammar",
        ),
        ({"adapter_id": "lora"}, "`adapter_id` is not supported"),
        ({"min_tokens": 10, "max_new_tokens": 5}, "`min_tokens` must be <="),
        ({"stop_token_ids": [-1]}, "`stop_token_ids` must hold token ids in [0, 4294967295]"),
        ({"details": "yes"}, "`details` must be bool"),
    ],
)
async def test_validation_errors(router, fake, parameters, message):
    answer = await router.post("/generate", json={"inputs": "the city", "parameters": parameters})
    body = await answer.json()
    assert answer.status == 422, body
    assert_error(body, "validation")
    assert message in body["error"]
    assert not fake.calls_of("prefill")


async def test_request_shape_errors(router):
    cases = [
        ({"inputs": ""}, 422, "`inputs` cannot be empty"),
        ({"parameters": {}}, 422, "`inputs` is required"),
        ([1, 2], 422, "JSON object"),
        ({"inputs": "a", "parameters": []}, 422, "`parameters` must be a JSON object"),
    ]
    for body, status, message in cases:
        answer = await router.post("/generate", json=body)
        error = await answer.json()
        assert answer.status == status and message in error["error"]
        assert_error(error, "validation")
    answer = await router.post("/generate", data=b"{not json")
    assert answer.status == 400
    assert_error(await answer.json(), "bad_request")
    answer = await router.post("/generate", data=b"x" * 2_000_001)
    assert answer.status == 413
    assert_error(await answer.json(), "payload_too_large")
    answer = await router.post(
        "/generate_stream",
        json={"inputs": "a", "parameters": {"decoder_input_details": True}},
    )
    assert answer.status == 422
    assert "not supported when streaming" in (await answer.json())["error"]


async def test_input_too_long_and_truncate(router, tokenizer):
    long_text = "the " * 200
    answer = await router.post(
        "/generate", json={"inputs": long_text, "parameters": {"max_new_tokens": 1}}
    )
    assert answer.status == 422
    assert "Given: 202 `inputs` tokens and 1 `max_new_tokens`" in (await answer.json())["error"]
    just_too_long = "the" + " a" * 126
    assert len(tokenizer.encode(just_too_long)) == 128
    answer = await router.post("/generate", json={"inputs": just_too_long})
    assert "`inputs` must have less than 127 tokens. Given: 128" in (await answer.json())["error"]
    answer = await router.post(
        "/generate",
        json={"inputs": long_text, "parameters": {"max_new_tokens": 2, "truncate": 10}},
    )
    assert answer.status == 200


async def test_out_of_vocabulary_prompt_is_422_and_spares_the_others(tokenizer):
    """The tokenizer knows one token more than the model: the router refuses a prompt that uses
    it, which the shard would refuse with the whole prefill batch around it."""
    last_id = len(tokenizer) - 1
    fake = FakeShardClient(fixed_script(tokenizer), tokenizer.eos_token_id, vocab_size=last_id)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128)
    try:
        bad = {"inputs": "a" + tokenizer.decode([last_id])}
        refused, answered = await asyncio.gather(
            client.post("/generate", json=bad), client.post("/generate", json={"inputs": "a"})
        )
        error = await refused.json()
        assert refused.status == 422, error
        assert_error(error, "validation")
        message = f"token id {last_id}, outside the model's vocabulary of {last_id} tokens"
        assert message in error["error"]
        assert answered.status == 200
        assert (await answered.json())["generated_text"] == CONTINUATION
        assert [len(call[2]) for call in fake.calls_of("prefill")] == [1]  # the good one alone
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_overloaded_past_max_concurrent_requests(tokenizer):
    fake = FakeShardClient(fixed_script(tokenizer), tokenizer.eos_token_id, step_delay=0.05)
    client, ctx = await router_client(
        fake, tokenizer, max_total_tokens=128, max_concurrent_requests=2
    )
    try:
        body = {"inputs": "a", "parameters": {"max_new_tokens": 5}}
        running = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(2)]
        await asyncio.sleep(0.05)
        answer = await client.post("/generate", json=body)
        assert answer.status == 429
        assert_error(await answer.json(), "overloaded")
        assert all(r.status == 200 for r in await asyncio.gather(*running))
        assert (await client.post("/generate", json=body)).status == 200
        text = (await (await client.get("/metrics")).read()).decode()
        assert 'tgi_request_failure{err="overloaded"} 1.0' in text
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_disconnect_cancels_and_frees_the_sequence(tokenizer):
    script = lambda prompt: [tokenizer.encode("the")[0]] * 500  # noqa: E731
    fake = FakeShardClient(script, tokenizer.eos_token_id, step_delay=0.01)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=1024)
    try:
        for path in ("/generate_stream", "/generate"):
            answer = await client.post(path, json={"inputs": "a", "parameters": {}})
            if path == "/generate_stream":
                await answer.content.readuntil(b"\n\n")
            else:
                await asyncio.sleep(0.05)
            answer.close()
            for _ in range(200):
                if fake.num_sequences == 0 and ctx.batcher.running_size == 0:
                    break
                await asyncio.sleep(0.01)
            assert fake.num_sequences == 0 and ctx.batcher.running_size == 0, path
            assert ctx.in_flight == 0
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_generation_error_is_424_and_mid_stream_is_an_event(tokenizer):
    fake = FakeShardClient(fixed_script(tokenizer), tokenizer.eos_token_id, fail_on="prefill")
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128)
    try:
        answer = await client.post("/generate", json={"inputs": "a"})
        assert answer.status == 424
        assert_error(await answer.json(), "generation")
        answer = await client.post("/generate_stream", json={"inputs": "a"})
        assert answer.status == 424
        fake.fail_on = "decode"
        answer = await client.post("/generate_stream", json={"inputs": "a"})
        assert answer.status == 200
        events = _sse_events(await answer.read())
        assert_schema(events[0], "StreamResponse")
        assert_error(events[-1], "generation")
        fake.fail_on = None
        assert (await client.post("/generate", json={"inputs": "a"})).status == 200
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_api_key(tokenizer, fake):
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128, api_key="s3cret")
    try:
        assert (await client.post("/generate", json={"inputs": "a"})).status == 401
        assert (await client.get("/health")).status == 200
        headers = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/generate", json={"inputs": "a"}, headers=headers)).status == 200
    finally:
        await client.close()
        await ctx.batcher.stop()
