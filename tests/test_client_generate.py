"""The Python client (clients/python) against the mock TGI server (tests/mock_tgi.py): generate,
streams, chat, and drop-in compatibility with the `text_generation` package."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import typing
from pathlib import Path

import pytest
import shardline_client
import text_generation
import text_generation.errors
import text_generation.types
from shardline_client import errors, types
from shardline_client.protocol import EventStream

from tests import mock_tgi
from tests.mock_tgi import MockTGI, _async_client, _client, _texts

mock = mock_tgi.mock
no_spec_violations = mock_tgi.no_spec_violations

CLIENT_README = Path(__file__).resolve().parents[1] / "clients/python/README.md"


# ---------------------------------------------------------------- generate


def test_generate_sends_every_parameter_and_parses_details(mock: MockTGI) -> None:
    grammar = types.Grammar(type=types.GrammarType.Json, value={"type": "object"})
    vllm_extras = {
        "presence_penalty": 0.2,
        "min_p": 0.05,
        "min_tokens": 2,
        "ignore_eos": True,
        "skip_special_tokens": False,
        "stop_token_ids": [2, 3],
    }
    response = _client(mock).generate(
        "hello",
        do_sample=True,
        max_new_tokens=3,
        best_of=2,
        repetition_penalty=1.1,
        frequency_penalty=0.3,
        return_full_text=True,
        stop_sequences=["###"],
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        truncate=100,
        typical_p=0.95,
        watermark=True,
        decoder_input_details=True,
        top_n_tokens=2,
        grammar=grammar,
        **vllm_extras,
    )
    sent = mock.bodies[-1]["parameters"]
    assert sent["stop"] == ["###"] and sent["details"] is True
    assert sent["grammar"] == {"type": "json", "value": {"type": "object"}}
    assert {key: sent[key] for key in vllm_extras} == vllm_extras
    assert response.generated_text == "hello" + "".join(_texts("hello", 3))
    details = response.details
    assert details.finish_reason is types.FinishReason.Length
    assert [token.text for token in details.tokens] == _texts("hello", 3)
    assert details.prefill == [types.PrefillToken(id=1, text="<s>", logprob=None)]
    assert len(details.top_tokens) == 3 and len(details.top_tokens[0]) == 2
    assert isinstance(details.best_of_sequences[0], types.BestOfSequence)


def test_generate_omits_unset_options(mock: MockTGI) -> None:
    _client(mock).generate("plain")
    assert mock.bodies[-1]["parameters"] == {
        "do_sample": False,
        "max_new_tokens": 20,
        "return_full_text": False,
        "watermark": False,
        "stop": [],
        "details": True,
    }


def test_bad_options_raise_before_sending(mock: MockTGI) -> None:
    client = _client(mock)
    sent = len(mock.bodies)
    with pytest.raises(errors.ValidationError, match="temperature"):
        client.generate("x", temperature="hot")
    with pytest.raises(errors.ValidationError, match="best_of"):
        list(client.generate_stream("x", best_of=2))
    with pytest.raises(errors.ValidationError, match="messages"):
        client.chat([{"content": "no role"}])
    assert len(mock.bodies) == sent


def test_headers_cookies_and_api_key_are_sent(mock: MockTGI) -> None:
    client = _client(mock, headers={"X-Trace": "t1"}, cookies={"session": "c1"}, api_key="k3y")
    client.generate("auth")
    request = mock.seen[-1]
    assert request.headers["Authorization"] == "Bearer k3y"
    assert request.headers["X-Trace"] == "t1"
    assert request.cookies["session"] == "c1"


async def test_async_generate(mock: MockTGI) -> None:
    response = await _async_client(mock, api_key="k").generate("async", max_new_tokens=2)
    assert response.generated_text == "".join(_texts("async", 2))
    assert mock.seen[-1].headers["Authorization"] == "Bearer k"


# ---------------------------------------------------------------- streams


def test_generate_stream_yields_tokens_in_order(mock: MockTGI) -> None:
    responses = list(_client(mock).generate_stream("s", max_new_tokens=5, min_p=0.1))
    assert mock.bodies[-1]["parameters"]["min_p"] == 0.1
    assert [response.index for response in responses] == [1, 2, 3, 4, 5]
    assert [response.token.text for response in responses] == _texts("s", 5)
    assert all(response.details is None for response in responses[:-1])
    last = responses[-1]
    assert last.generated_text == "".join(_texts("s", 5))
    assert last.details == types.StreamDetails(
        finish_reason="length", generated_tokens=5, input_length=3
    )


async def test_async_generate_stream_yields_tokens_in_order(mock: MockTGI) -> None:
    stream = _async_client(mock).generate_stream("a", max_new_tokens=4)
    texts = [response.token.text async for response in stream]
    assert texts == _texts("a", 4)


async def test_async_client_16_concurrent_streams(mock: MockTGI) -> None:
    prompts = [f"p{i}" for i in range(16)]

    async def stream(client: shardline_client.AsyncClient, prompt: str) -> list[str]:
        return [r.token.text async for r in client.generate_stream(prompt, max_new_tokens=8)]

    async with _async_client(mock) as client:
        results = await asyncio.gather(*(stream(client, prompt) for prompt in prompts))
    assert results == [_texts(prompt, 8) for prompt in prompts]
    assert mock.peak["p"] == 16


def test_chat(mock: MockTGI) -> None:
    messages = [
        types.Message(role="system", content="Be brief."),
        {"role": "user", "content": "hi"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    reply = _client(mock).chat(messages, max_tokens=3, temperature=0.5, tools=tools, min_p=0.1)
    sent = mock.bodies[-1]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["tools"][0]["function"] == {"name": "f", "arguments": {}}
    assert sent["min_p"] == 0.1 and sent["stream"] is False
    assert isinstance(reply, types.ChatCompletion)
    assert reply.choices[0].message.content == "".join(_texts("hi", 3))
    assert reply.usage.completion_tokens == 3


def test_chat_stream_stops_at_done(mock: MockTGI) -> None:
    chunks = list(_client(mock).chat([{"role": "user", "content": "c"}], stream=True, max_tokens=4))
    assert [chunk.choices[0].delta.content for chunk in chunks] == _texts("c", 4)
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None, None, None, "length"]


async def test_async_chat(mock: MockTGI) -> None:
    client = _async_client(mock)
    messages = [{"role": "user", "content": "ac"}]
    reply = await client.chat(messages, max_tokens=2)
    assert reply.choices[0].message.content == "".join(_texts("ac", 2))
    chunks = await client.chat(messages, stream=True, max_tokens=3)
    assert [chunk.choices[0].delta.content async for chunk in chunks] == _texts("ac", 3)


def test_event_stream_handles_any_chunking() -> None:
    events = [{"index": 1, "token": {"id": 1, "text": "é🙂", "logprob": None, "special": False}}]
    body = ": keep-alive\r\n\r\n" + "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events)
    stream = EventStream(types.StreamResponse, 200)
    raw = body.encode()
    parsed = [event for i in range(len(raw)) for event in stream.feed(raw[i : i + 1])]
    assert [event.token.text for event in parsed] == ["é🙂"]
    unterminated = EventStream(types.StreamResponse, 200)
    assert list(unterminated.feed(b"data:" + json.dumps(events[0]).encode())) == []
    assert len(list(unterminated.finish())) == 1


# ---------------------------------------------------------------- text_generation compatibility


def _accepted_arguments(function: typing.Callable) -> set[str]:
    hints = typing.get_type_hints(function, include_extras=True)
    (options_type,) = typing.get_args(hints["options"])
    return set(inspect.signature(function).parameters) | set(options_type.__annotations__)


@pytest.mark.parametrize("method", ["generate", "generate_stream", "chat"])
@pytest.mark.parametrize("client_class", ["Client", "AsyncClient"])
def test_accepts_every_text_generation_argument(client_class: str, method: str) -> None:
    theirs = getattr(getattr(text_generation, client_class), method)
    ours = getattr(getattr(shardline_client, client_class), method)
    assert set(inspect.signature(theirs).parameters) <= _accepted_arguments(ours)


def test_exports_text_generation_names() -> None:
    error_names = {
        name
        for name, value in vars(text_generation.errors).items()
        if isinstance(value, type) and issubclass(value, Exception)
    } - {"NotSupportedError"}
    request_only = {"Parameters", "Request", "ChatRequest", "DeployedModel"}
    type_names = {
        name
        for name, value in vars(text_generation.types).items()
        if isinstance(value, type) and value.__module__ == "text_generation.types"
    } - request_only
    assert error_names <= set(vars(errors))
    assert type_names <= set(vars(types))


def test_readme_example_runs(mock: MockTGI) -> None:
    code = re.search(r"```python\n(.*?)```", CLIENT_README.read_text(), re.S)[1]
    exec(code.replace("http://localhost:8080", mock.url), {})
