"""Where TGI's own behaviour, not only its schema, is the contract, checked over the fake shard
with raw bodies and the official `text_generation` client."""

from __future__ import annotations

import asyncio
import json

from text_generation import Client

from tests.fake_shard import CONTINUATION
from tests.router_assertions import assert_schema


def _sse(raw: bytes) -> list[dict]:
    return [json.loads(chunk[5:]) for chunk in raw.split(b"\n\n") if chunk.startswith(b"data:")]


async def test_generate_leaves_details_out_unless_asked(router):
    """TGI's `details` is false by default (serde's default, whatever its spec says) and the
    answer then has no `details` key at all; `decoder_input_details` asks for them too."""
    plain = await (await router.post("/generate", json={"inputs": "the city"})).json()
    assert plain == {"generated_text": CONTINUATION}
    assert_schema(plain, "GenerateResponse")
    asked = {"inputs": "the city", "parameters": {"details": True}}
    details = (await (await router.post("/generate", json=asked)).json())["details"]
    assert details["finish_reason"] == "eos_token" and details["tokens"]
    assert "best_of_sequences" not in details  # TGI skips it when there are none
    prefill = {"inputs": "the city", "parameters": {"decoder_input_details": True}}
    body = await (await router.post("/generate", json=prefill)).json()
    assert body["details"]["prefill"][0]["logprob"] is None


async def test_generate_stream_has_final_details_only_when_asked(router):
    events = _sse(await (await router.post("/generate_stream", json={"inputs": "a"})).read())
    assert events[-1]["generated_text"] == CONTINUATION
    assert all(event["details"] is None for event in events)
    body = {"inputs": "a", "parameters": {"details": True}}
    events = _sse(await (await router.post("/generate_stream", json=body)).read())
    assert events[-1]["details"]["finish_reason"] == "eos_token"
    assert all(event["details"] is None for event in events[:-1])


async def test_the_text_generation_client_still_gets_its_details(router):
    """The official client always sends `details: true` and reads them."""
    client = Client(str(router.make_url("")))
    response = await asyncio.to_thread(client.generate, "the city", max_new_tokens=4)
    assert response.details.generated_tokens == 4
    assert response.details.finish_reason.value == "length"
    streamed = await asyncio.to_thread(
        lambda: list(client.generate_stream("the city", max_new_tokens=4))
    )
    assert streamed[-1].details.generated_tokens == 4


async def test_generated_text_keeps_the_matched_stop_sequence_as_tgi_does(router):
    """TGI stops once the text ends with a stop sequence (its StopSequenceCriteria) and answers
    the decoded tokens, the stop sequence included, on /generate and /generate_stream alike;
    the OpenAI routes leave it out, as OpenAI does."""
    parameters = {"stop": ["naïve"], "max_new_tokens": 40, "details": True}
    body = {"inputs": "a", "parameters": parameters}
    answer = await (await router.post("/generate", json=body)).json()
    assert answer["generated_text"] == " the café naïve"
    assert answer["details"]["finish_reason"] == "stop_sequence"
    events = _sse(await (await router.post("/generate_stream", json=body)).read())
    assert events[-1]["generated_text"] == " the café naïve"
    assert "".join(e["token"]["text"] for e in events).startswith(" the café naïve")
    openai_body = {"prompt": "a", "stop": ["naïve"], "max_tokens": 40}
    completion = await (await router.post("/v1/completions", json=openai_body)).json()
    assert completion["choices"][0]["text"] == " the café "
