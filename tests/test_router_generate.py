"""TGI's REST API over a fake shard: generate, generate_stream, SSE, info/health/metrics/tokenize,
bodies validated against TGI's OpenAPI schemas, and the official `text_generation` clients."""

from __future__ import annotations

import asyncio

import pytest
from text_generation import AsyncClient, Client
from text_generation import errors as tg_errors

from tests.fake_shard import CONTINUATION
from tests.router_assertions import TGI_SPEC, _sse_events, assert_error, assert_schema


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


async def test_unknown_parameters_are_ignored_as_tgi_does(router, fake):
    plain = await router.post("/generate", json={"inputs": "the city"})
    typo = {"inputs": "the city", "parameters": {"temprature": 0.5, "max_new_tokens": None}}
    answer = await router.post("/generate", json=typo)
    assert answer.status == 200, await answer.text()
    assert (await answer.json()) == (await plain.json())


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
    ours_only = {  # OpenAI's, where TGI has nothing: legacy logprobs, the Responses API, the
        # usage's prompt_tokens_details (prefix-cached tokens)
        *("CompletionLogprobs", "PromptTokensDetails"),
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
