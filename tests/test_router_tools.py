"""Tool calling on /v1/chat/completions (TGI's): the grammar and prompt sent to a fake shard, the
answers the official `openai` client reads, streamed and not, and real constrained generation
over a shard process on the tiny model."""

from __future__ import annotations

import json

import jsonschema
import pytest

from shardline.proto import generate_pb2 as pb
from shardline.router.tools import DEFAULT_TOOL_PROMPT, NO_TOOL
from tests.fake_shard import CONTINUATION, FakeShardClient, router_client
from tests.fake_shard import tiny_tokenizer as build_tokenizer
from tests.model_factory import CHAT_TEMPLATE
from tests.openai_route_helpers import post_stream
from tests.router_assertions import assert_error, assert_refused, assert_schema
from tests.router_fixtures import open_router, openai_client

USER = [{"role": "user", "content": "weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Local time", "parameters": {}},
    },
]
FORCED = {"type": "function", "function": {"name": "get_weather"}}
CALL_TEXT = '{"function": {"_name": "get_weather", "city": "Paris", "unit": "celsius"}}'
NO_TOOL_TEXT = '{"function": {"_name": "no_tool"}}'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tools-tokenizer"))


def _script(tokenizer, with_tools: str):
    """Prompts with the tool prompt continue with `with_tools`, the others with CONTINUATION."""
    eos = tokenizer.eos_token_id
    tool_ids = tokenizer.encode(with_tools, add_special_tokens=False) + [eos]
    plain_ids = tokenizer.encode(CONTINUATION, add_special_tokens=False) + [eos]
    marker = "Do not use variables"
    return lambda prompt: tool_ids if marker in tokenizer.decode(prompt) else plain_ids


async def _router(tokenizer, with_tools: str = CALL_TEXT):
    fake = FakeShardClient(_script(tokenizer, with_tools), tokenizer.eos_token_id)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=1024)
    return client, ctx, fake


@pytest.fixture
async def served(tokenizer):
    client, ctx, fake = await _router(tokenizer)
    yield client, fake
    await client.close()
    await ctx.batcher.stop()


@pytest.fixture
async def no_tool_served(tokenizer):
    client, ctx, fake = await _router(tokenizer, NO_TOOL_TEXT)
    yield client, fake
    await client.close()
    await ctx.batcher.stop()


def _grammar(request: pb.Request) -> dict:
    assert request.parameters.grammar_type == pb.GRAMMAR_TYPE_JSON
    return json.loads(request.parameters.grammar)


def _branches(grammar: dict) -> list[str]:
    return [ref["$ref"].rsplit("/", 1)[1] for ref in grammar["properties"]["function"]["anyOf"]]


async def test_forced_tool_call_request_and_answer(served, tokenizer):
    client, fake = served
    answer = await openai_client(client).chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=FORCED
    )
    grammar = _grammar(fake.requests[0])
    assert _branches(grammar) == ["get_weather"]
    branch = grammar["$functions"]["get_weather"]
    assert branch["properties"]["_name"] == {"type": "string", "const": "get_weather"}
    assert branch["required"] == ["_name", "city", "unit"]
    prompt = tokenizer.decode(fake.requests[0].input_ids)
    assert '"name": "get_weather"' in prompt and '"name": "get_time"' not in prompt
    assert "weather in Paris?\n---\n[{" in prompt
    assert prompt.endswith(f"}}]\n{DEFAULT_TOOL_PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None  # OpenAI's
    call = choice.message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == ("0", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    body = {"messages": USER, "tools": TOOLS, "tool_choice": "get_weather"}
    raw = await (await client.post("/v1/chat/completions", json=body)).json()
    assert_schema(raw, "ChatCompletion")
    assert raw["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


async def test_forced_tool_call_streams_tgi_deltas(served):
    client, _ = served
    stream = await openai_client(client).chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=FORCED, stream=True
    )
    chunks = [chunk async for chunk in stream]
    calls = [chunk.choices[0].delta.tool_calls[0] for chunk in chunks]
    assert [call.function.name for call in calls] == ["get_weather"] + [None] * (len(calls) - 1)
    assert {call.id for call in calls} == {"0"} and {call.index for call in calls} == {0}
    arguments = "".join(call.function.arguments for call in calls)
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    assert [chunk.choices[0].finish_reason for chunk in chunks][-2:] == [None, "tool_calls"]
    body = {"messages": USER, "tools": TOOLS, "tool_choice": "required", "stream": True}
    for chunk in await post_stream(client, "/v1/chat/completions", body):
        assert_schema(chunk, "ChatCompletionChunk")


async def test_a_tool_call_cut_by_the_token_limit_finishes_with_length(served, tokenizer):
    client, _ = served
    named = CALL_TEXT[: CALL_TEXT.index('"city"')]
    limit = len(tokenizer.encode(named, add_special_tokens=False)) + 2
    stream = await openai_client(client).chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=FORCED, stream=True, max_tokens=limit
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.tool_calls[0].function.name == "get_weather"
    assert [chunk.choices[0].finish_reason for chunk in chunks][-2:] == [None, "length"]


async def test_auto_offers_no_tool_and_answers_again_without_tools(no_tool_served, tokenizer):
    client, fake = no_tool_served
    api = openai_client(client)
    answer = await api.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
    assert answer.choices[0].message.content == CONTINUATION
    assert answer.choices[0].message.tool_calls is None
    assert _branches(_grammar(fake.requests[0])) == ["get_weather", "get_time", NO_TOOL]
    again = fake.requests[1]
    assert again.parameters.grammar_type == pb.GRAMMAR_TYPE_NONE
    assert DEFAULT_TOOL_PROMPT not in tokenizer.decode(again.input_ids)
    stream = await api.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="auto", stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(chunk.choices[0].delta.content for chunk in chunks) == CONTINUATION
    assert all(chunk.choices[0].delta.tool_calls is None for chunk in chunks)
    assert len(fake.requests) == 4


async def test_tool_choice_none_is_a_request_without_tools(served):
    client, fake = served
    api = openai_client(client)
    plain = await api.chat.completions.create(model="tiny", messages=USER)
    none = await api.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="none"
    )
    assert none.choices[0].message.content == plain.choices[0].message.content == CONTINUATION
    assert fake.requests[0].input_ids == fake.requests[1].input_ids
    assert fake.requests[1].parameters.grammar_type == pb.GRAMMAR_TYPE_NONE


async def test_a_template_that_takes_tools_gets_them(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    tools = "{% if tools %}{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% endif %}"
    tokenizer.chat_template = tools
    tokenizer.chat_template += CHAT_TEMPLATE
    client, ctx, fake = await _router(tokenizer)
    try:
        answer = await openai_client(client).chat.completions.create(
            model="tiny", messages=USER, tools=TOOLS, tool_choice="required"
        )
        assert answer.choices[0].message.tool_calls[0].function.name == "get_weather"
        prompt = tokenizer.decode(fake.requests[0].input_ids)
        assert prompt.startswith("[get_weather][get_time]<|im_start|>user")
        assert f"weather in Paris?\n---\n{DEFAULT_TOOL_PROMPT}<|im_end|>" in prompt
    finally:
        await client.close()
        await ctx.batcher.stop()


def _tool(name: str, parameters: object) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tools": [_tool("f", {"properties": {"a": {"type": "bogus"}}})]}, "not a usable"),
        ({"tools": [_tool("f", {"type": "string"})]}, "JSON schema of type object"),
        ({"tools": [_tool("f", {}), _tool("f", {})]}, "names must be unique"),
        ({"tools": [_tool("a b", {})]}, "function.name must match"),
        ({"tools": [{"type": "retrieval"}]}, '`tools[0]` must be {"type": "function"'),
        ({"tools": TOOLS, "tool_choice": {"function": {"name": "nope"}}}, "nope not found"),
        ({"tools": TOOLS, "tool_choice": 3}, "`tool_choice` must be"),
        ({"tool_choice": "required"}, "'required' needs `tools`"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "cannot be used together"),
        ({"tools": TOOLS, "n": 2}, "`n` > 1 is not supported with `tools`"),
    ],
)
async def test_bad_tools_are_422(served, body, message):
    client, fake = served
    answer = await client.post("/v1/chat/completions", json={"messages": USER, **body})
    await assert_refused(answer, "tool_error", message, fake)


# ---- multi-turn tool use -----------------------------------------------------------------------

TOOL_TEMPLATE = (  # reads calls and results the way transformers' tool-use templates do
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call id={{ c.id }}>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>"
    "{% endfor %}{% elif m.role == 'tool' %}"
    "<tool_response id={{ m.tool_call_id }}>{{ m.content }}</tool_response>"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARGUMENTS = {"city": "Paris", "unit": "celsius"}
RESULT = {"role": "tool", "tool_call_id": "call-7", "content": "22 C"}
RENDERED = (
    "<|im_start|>user\nweather in Paris?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call id=call-7>get_weather {"city": "Paris", "unit": "celsius"}'
    "</tool_call><|im_end|>\n"
    "<|im_start|>tool\n<tool_response id=call-7>22 C</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _called(arguments: object, content: object = None) -> dict:
    function = {"name": "get_weather", "arguments": arguments}
    call = {"id": "call-7", "type": "function", "function": function}
    return {"role": "assistant", "content": content, "tool_calls": [call]}


def _turns_script(tokenizer):
    """A tool call until the prompt holds a tool's result, then `no_tool`; CONTINUATION without
    tools."""
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) + [eos]

    def script(prompt: list[int]) -> list[int]:
        text = tokenizer.decode(prompt)
        if "Do not use variables" not in text:
            return ids(CONTINUATION)
        return ids(NO_TOOL_TEXT if "<tool_response" in text else CALL_TEXT)

    return script


@pytest.fixture
async def tool_template_served(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    tokenizer.chat_template = TOOL_TEMPLATE
    fake = FakeShardClient(_turns_script(tokenizer), tokenizer.eos_token_id)
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=1024)
    yield client, fake, tokenizer
    await client.close()
    await ctx.batcher.stop()


@pytest.mark.parametrize(
    "called",
    [
        _called(json.dumps(ARGUMENTS)),  # OpenAI's JSON string
        _called(ARGUMENTS, content=""),  # transformers' object
        _called(json.dumps(ARGUMENTS), content=[]),
    ],
)
async def test_tool_calls_and_results_reach_the_template(tool_template_served, called):
    client, fake, tokenizer = tool_template_served
    body = {"messages": [*USER, called, RESULT]}
    answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status == 200, await answer.text()
    assert (await answer.json())["choices"][0]["message"]["content"] == CONTINUATION
    assert tokenizer.decode(fake.requests[0].input_ids) == RENDERED


async def test_a_template_that_ignores_tool_calls_is_422(served, tokenizer):
    client, fake = served  # CHAT_TEMPLATE renders `content` only
    for path in ("/v1/chat/completions", "/chat_tokenize"):
        body = {"messages": [*USER, _called(json.dumps(ARGUMENTS)), RESULT], "tools": TOOLS}
        answer = await client.post(path, json=body)
        error = await answer.json()
        assert answer.status == 422, error
        assert_error(error, "template_error")
        assert "cannot render tool calls (`messages[1]`.tool_calls)" in error["error"]
    answer = await client.post("/v1/chat/completions", json={"messages": [*USER, RESULT]})
    assert answer.status == 200  # a tool result alone is a message like any other
    assert len(fake.requests) == 1
    assert "<|im_start|>tool\n22 C<|im_end|>\n" in tokenizer.decode(fake.requests[0].input_ids)


def _call(**changes: object) -> dict:
    function = {"name": "get_weather", "arguments": "{}", **changes.pop("function", {})}
    return {"id": "call-7", "type": "function", "function": function, **changes}


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"role": "user", "tool_calls": [_call()]}, "only assistant messages call tools"),
        ({"role": "assistant", "tool_calls": {}}, "tool_calls must be a list"),
        ({"role": "assistant", "tool_calls": [_call(type="code")]}, 'must be {"id": ...'),
        ({"role": "assistant", "tool_calls": [_call(id=None)]}, "tool_calls[0].id must be"),
        (
            {"role": "assistant", "tool_calls": [_call(function={"name": 3})]},
            "tool_calls[0].function.name must be a string",
        ),
        (
            {"role": "assistant", "tool_calls": [_call(function={"arguments": "{oops"})]},
            "function.arguments must be a JSON object or a string holding one",
        ),
        (
            {"role": "assistant", "tool_calls": [_call(function={"arguments": "[1]"})]},
            "function.arguments must be a JSON object",
        ),
        ({**RESULT, "tool_call_id": 7}, "`messages[1]`.tool_call_id must be a string"),
    ],
)
async def test_bad_tool_messages_are_422(tool_template_served, message, error):
    client, fake, _ = tool_template_served
    answer = await client.post("/v1/chat/completions", json={"messages": [*USER, message]})
    await assert_refused(answer, "validation", error, fake)


async def test_openai_client_two_turn_tool_loop(tool_template_served):
    client, fake, tokenizer = tool_template_served
    api = openai_client(client)
    messages: list = list(USER)
    first = await api.chat.completions.create(model="tiny", messages=messages, tools=TOOLS)
    message = first.choices[0].message
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"
    messages += [message, {"role": "tool", "tool_call_id": call.id, "content": "22 C"}]
    second = await api.chat.completions.create(model="tiny", messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == CONTINUATION
    assert second.choices[0].message.tool_calls is None
    with_tools, without_tools = (tokenizer.decode(r.input_ids) for r in fake.requests[1:])
    assert f"<tool_response id={call.id}>22 C\n---\n" in with_tools
    assert without_tools == RENDERED.replace("call-7", call.id)


# ---- a real shard process on the tiny model ----------------------------------------------------


@pytest.fixture
async def real_router(shard_socket, tiny_llama_dir):
    async with open_router(shard_socket, tiny_llama_dir, max_total_tokens=1024) as client:
        yield client


async def test_real_forced_tool_call_validates_against_its_schema(real_router):
    api = openai_client(real_router)
    options = {"model": "tiny", "messages": USER, "tools": TOOLS, "max_tokens": 96}
    answer = await api.chat.completions.create(**options, tool_choice=FORCED, temperature=0)
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert answer.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    stream = await api.chat.completions.create(
        **options, tool_choice=FORCED, temperature=1.0, seed=3, stream=True
    )
    calls = [chunk.choices[0].delta.tool_calls[0] async for chunk in stream]
    assert calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads("".join(c.function.arguments for c in calls)), WEATHER)
    plain = await api.chat.completions.create(model="tiny", messages=USER, max_tokens=8, seed=1)
    none = await api.chat.completions.create(
        model="tiny", messages=USER, max_tokens=8, seed=1, tools=TOOLS, tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == plain.choices[0].message.content
