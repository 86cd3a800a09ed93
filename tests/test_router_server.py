"""TGI's REST API over a fake shard: bodies validated against TGI's OpenAPI schemas, SSE,
errors and status codes, 429, disconnects, and the official `text_generation` clients."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import jsonschema
import pytest
from text_generation import AsyncClient, Client
from text_generation import errors as tg_errors

from tests.fake_shard import (
    CONTINUATION,
    FakeShardClient,
    fixed_script,
    router_client,
)

TGI_SPEC_PATH = Path(__file__).resolve().parent / "data" / "tgi-openapi.json"  # see data/README.md
TGI_SPEC = json.loads(TGI_SPEC_PATH.read_text())


def _as_json_schema(node):
    """OpenAPI 3.0 `nullable` becomes a JSON Schema union with null."""
    if isinstance(node, list):
        return [_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {k: _as_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable"):
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


_COMPONENTS = _as_json_schema(copy.deepcopy(TGI_SPEC["components"]))


def assert_schema(instance, name: str) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": _COMPONENTS}
    jsonschema.validate(instance, schema)


def assert_error(body, error_type: str) -> None:
    assert_schema(body, "ErrorResponse")
    assert body["error_type"] == error_type


async def assert_refused(answer, error_type: str, message: str, fake: FakeShardClient) -> None:
    """A 422 in TGI's error JSON whose error names `message`, and nothing reached the shard."""
    error = await answer.json()
    assert answer.status == 422, error
    assert_error(error, error_type)
    assert message in error["error"]
    assert not fake.requests


def _sse_events(raw: bytes) -> list[dict]:
    chunks = raw.decode().split("\n\n")
    assert chunks[-1] == ""
    assert all(chunk.startswith("data:") for chunk in chunks[:-1])
    return [json.loads(chunk[len("data:") :]) for chunk in chunks[:-1]]


async def test_generate(router, fake):
    body = {"inputs": "the city", "parameters": {"details": True}}
    answer = await router.post("/generate", json=body)
    assert answer.status == 200
    body = await answer.json()
    assert_schema(body, "GenerateResponse")
    assert body["generated_text"] == CONTINUATION
    details = body["details"]
    assert details["finish_reason"] == "eos_token"
    assert details["tokens"][-1]["special"] is True
    assert details["generated_tokens"] == len(details["tokens"])
    assert details["seed"] is None
    assert fake.num_sequences == 0


async def test_generate_options(router):
    parameters = {
        "max_new_tokens": 3,
        "return_full_text": True,
        "decoder_input_details": True,
        "top_n_tokens": 2,
        "do_sample": True,
        "seed": 7,
    }
    body = await (
        await router.post("/generate", json={"inputs": "the city", "parameters": parameters})
    ).json()
    assert_schema(body, "GenerateResponse")
    details = body["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 3
    assert body["generated_text"].startswith("the city")
    assert details["seed"] == 7
    assert details["prefill"][0]["logprob"] is None
    assert "".join(t["text"] for t in details["prefill"]) == "the city"
    assert [len(top) for top in details["top_tokens"]] == [2, 2, 2]


async def test_details_false_and_compat_routes(router):
    body = await (
        await router.post("/generate", json={"inputs": "a", "parameters": {"details": False}})
    ).json()
    assert body == {"generated_text": CONTINUATION}  # TGI leaves `details` out
    for path in ("/", "/invocations"):
        answer = await router.post(path, json={"inputs": "a", "stream": False})
        listed = await answer.json()
        assert answer.status == 200 and isinstance(listed, list) and len(listed) == 1
        assert_schema(listed[0], "GenerateResponse")
    streamed = await router.post("/", json={"inputs": "a", "stream": True})
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    assert _sse_events(await streamed.read())[-1]["generated_text"] == CONTINUATION


async def test_generate_stream(router, tokenizer):
    answer = await router.post(
        "/generate_stream", json={"inputs": "the city", "parameters": {"details": True}}
    )
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    events = _sse_events(await answer.read())
    for event in events:
        assert_schema(event, "StreamResponse")
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == CONTINUATION
    assert last["details"]["finish_reason"] == "eos_token"
    assert last["details"]["input_length"] == len(tokenizer.encode("the city"))
    text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert text == CONTINUATION and "\ufffd" not in text


async def test_stop_sequence_over_http(router):
    parameters = {"stop": ["naïve"], "max_new_tokens": 40, "details": True}
    body = await (
        await router.post("/generate", json={"inputs": "a", "parameters": parameters})
    ).json()
    assert body["generated_text"] == " the café naïve"  # TGI keeps the stop sequence
    assert body["details"]["finish_reason"] == "stop_sequence"


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


async def test_unknown_parameters_are_ignored_as_tgi_does(router, fake):
    plain = await router.post("/generate", json={"inputs": "the city"})
    typo = {"inputs": "the city", "parameters": {"temprature": 0.5, "max_new_tokens": None}}
    answer = await router.post("/generate", json=typo)
    assert answer.status == 200, await answer.text()
    assert (await answer.json()) == (await plain.json())


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


async def test_info_health_metrics_tokenize(router, fake):
    info = await (await router.get("/info")).json()
    assert_schema(info, "Info")
    assert info["max_concurrent_requests"] == 128 and info["max_best_of"] == 2
    assert info["max_total_tokens"] == 128 and info["max_input_tokens"] == 127
    assert info["model_dtype"] == "float32" and info["model_device_type"] == "cpu"
    assert (await router.get("/health")).status == 200
    fake.healthy = False
    answer = await router.get("/health")
    assert answer.status == 503
    assert_error(await answer.json(), "healthcheck")
    await router.post("/generate", json={"inputs": "a"})
    text = (await (await router.get("/metrics")).read()).decode()
    for name in (
        "tgi_request_count 1.0",
        "tgi_request_success 1.0",
        "tgi_request_duration_bucket",
        "tgi_request_queue_duration",
        "tgi_request_validation_duration",
        "tgi_request_inference_duration",
        "tgi_request_mean_time_per_token_duration",
        "tgi_request_input_length",
        "tgi_request_generated_tokens",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "tgi_queue_size",
        'tgi_batch_inference_duration_bucket{le="0.001",method="prefill"}',
        "tgi_batch_forward_duration",
    ):
        assert name in text, name
    tokens = await (await router.post("/tokenize", json={"inputs": "the café"})).json()
    assert_schema(tokens, "TokenizeResponse")
    assert "".join(t["text"] for t in tokens) == "the café"


async def test_openapi_is_consistent_with_tgi(router):
    ours = await (await router.get("/openapi.json")).json()
    for path in ("/", "/generate", "/generate_stream", "/info", "/health", "/metrics", "/tokenize"):
        assert path in ours["paths"], path
        assert set(ours["paths"][path]) == set(TGI_SPEC["paths"][path]), path
    theirs = TGI_SPEC["components"]["schemas"]
    ours_only = {  # OpenAI's, where TGI has nothing: legacy logprobs, the Responses API
        "CompletionLogprobs",
        *("ResponsesRequest", "ResponsesInputMessage", "ResponsesOutputMessage"),
        *("Response", "ResponseStreamEvent"),
    }
    assert ours_only <= set(ours["components"]["schemas"])
    for name, schema in ours["components"]["schemas"].items():
        if name in ours_only:
            continue
        tgi = theirs[name]
        assert set(schema.get("required", [])) == set(tgi.get("required", [])), name
        assert set(tgi.get("properties", {})) <= set(schema.get("properties", {})), name


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


async def test_official_text_generation_clients(router):
    base_url = str(router.make_url(""))
    sync_client = Client(base_url)
    response = await asyncio.to_thread(sync_client.generate, "the city", max_new_tokens=50)
    assert response.generated_text == CONTINUATION
    assert response.details.finish_reason.value == "eos_token"
    streamed = await asyncio.to_thread(
        lambda: list(sync_client.generate_stream("the city", max_new_tokens=50))
    )
    assert streamed[-1].generated_text == CONTINUATION
    async_client = AsyncClient(base_url)
    response = await async_client.generate("the city", max_new_tokens=4, stop_sequences=["café"])
    assert response.generated_text == " the café"
    assert response.details.finish_reason.value == "stop_sequence"
    tokens = [t async for t in async_client.generate_stream("the city", max_new_tokens=50)]
    assert tokens[-1].generated_text == CONTINUATION
    with pytest.raises(tg_errors.ValidationError, match="top_n_tokens"):
        await async_client.generate("the city", top_n_tokens=9)
