"""Where TGI's own behaviour, not only its schema, is the contract, checked over the fake shard
with raw bodies and the official `text_generation` client."""

from __future__ import annotations

import asyncio
import json

from text_generation import Client

from tests.test_router_fakes import CONTINUATION
from tests.test_router_server import assert_schema


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

