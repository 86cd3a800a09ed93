"""/v1/responses (OpenAI's Responses API, text) through the official `openai` client over the
recording fake shard: the prompt the chat template builds, the response object, the streamed
event sequence (raw SSE and through the client's stream helper), and the 422s."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import UnprocessableEntityError

from tests.fake_shard import CONTINUATION
from tests.openai_route_helpers import templated
from tests.router_assertions import _as_json_schema, assert_refused

STREAM_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 3,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


async def test_a_string_input_answers_a_response_object(api, router, fake, tokenizer):
    answer = await api.responses.create(
        model="tiny", input="the city", instructions="be brief", temperature=0.5, top_p=0.9
    )
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the city"}]
    prompt_ids = tokenizer.encode(templated(tokenizer, messages), add_special_tokens=False)
    assert list(fake.requests[-1].input_ids) == prompt_ids
    chooser = fake.requests[-1].parameters
    assert chooser.temperature == pytest.approx(0.5) and chooser.top_p == pytest.approx(0.9)
    assert answer.output_text == CONTINUATION and answer.status == "completed"
    assert answer.object == "response" and answer.id.startswith("resp_") and answer.model == "tiny"
    (item,) = answer.output
    assert (item.type, item.role, item.status) == ("message", "assistant", "completed")
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    generated = len(tokenizer.encode(CONTINUATION, add_special_tokens=False)) + 1
    usage = answer.usage
    assert (usage.input_tokens, usage.output_tokens) == (len(prompt_ids), generated)
    assert usage.total_tokens == len(prompt_ids) + generated
    assert answer.instructions == "be brief" and answer.store is False


async def test_message_items_and_max_output_tokens(api, fake, tokenizer):
    items = [
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "the"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Paris"}]},
        {"role": "user", "content": "river"},
    ]
    answer = await api.responses.create(model="tiny", input=items, max_output_tokens=3)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "river"},
    ]
    expected = tokenizer.encode(templated(tokenizer, messages), add_special_tokens=False)
    assert list(fake.requests[-1].input_ids) == expected
    assert fake.requests[-1].stopping_parameters.max_new_tokens == 3
    assert answer.status == "incomplete" and answer.incomplete_details.reason == "max_output_tokens"
    assert answer.usage.output_tokens == 3 and answer.max_output_tokens == 3


async def test_streamed_events_through_the_client(api):
    async with api.responses.stream(model="tiny", input="the city") as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == STREAM_EVENTS[:4] + ["response.output_text.delta"] * deltas + [
        *STREAM_EVENTS[-3:],
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == CONTINUATION == final.output_text
    assert events[0].response.status == "in_progress" and final.status == "completed"
    assert final.usage.output_tokens > 0 and final.id == events[0].response.id
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}


async def test_raw_sse_has_event_lines_and_ends_incomplete_at_the_limit(router):
    body = {"model": "tiny", "input": "the city", "stream": True, "max_output_tokens": 2}
    answer = await router.post("/v1/responses", json=body)
    assert answer.status == 200 and answer.headers["Content-Type"] == "text/event-stream"
    events = (await answer.read()).decode().split("\n\n")
    assert events[-1] == ""
    parsed = []
    for raw in events[:-1]:
        event_line, data_line = raw.split("\n")
        kind, data = (
            event_line.removeprefix("event: "),
            json.loads(data_line.removeprefix("data: ")),
        )
        assert data["type"] == kind
        parsed.append(data)
    assert parsed[-1]["type"] == "response.incomplete"
    assert parsed[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert parsed[-1]["response"]["usage"]["output_tokens"] == 2


async def test_stream_true_through_the_client_ends_incomplete_at_the_limit(api):
    stream = await api.responses.create(
        model="tiny", input="the city", stream=True, max_output_tokens=3
    )
    events = [event async for event in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output[0].content[0].text == "".join(
        event.delta for event in events if event.type == "response.output_text.delta"
    )
    assert events[-1].response.usage.output_tokens == 3


async def test_a_failure_mid_stream_is_an_error_event(router, fake):
    fake.fail_on = "decode"
    answer = await router.post("/v1/responses", json={"input": "the city", "stream": True})
    events = (await answer.read()).decode().split("\n\n")[:-1]
    kind, data = events[-1].split("\n")
    assert kind == "event: error"
    error = json.loads(data.removeprefix("data: "))
    assert error["code"] == "generation" and "CUDA error" in error["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"store": True}, "`store` must be false"),
        ({"previous_response_id": "resp_1"}, "`previous_response_id` is not supported"),
        ({"tools": [{"type": "function", "name": "f"}]}, "`tools` are not supported"),
        ({"tool_choice": "required"}, "`tool_choice` needs `tools`"),
        ({"background": True}, "`background` is not supported"),
        ({"input": []}, "`input` is required"),
        ({"input": [{"type": "function_call_output"}]}, "must be a message item"),
        ({"input": [{"role": "tool", "content": "x"}]}, "`input[0]`.role must be one of"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "type 'input_image' is not supported",
        ),
        ({"max_output_tokens": 0}, "`max_output_tokens` must be >= 1"),
        ({"temperature": -1}, "`temperature` must be >= 0"),
        ({"text": {"format": {"type": "xml"}}}, "`text.format` must be an object"),
        ({"stream": "yes"}, "`stream` must be a boolean"),
    ],
)
async def test_unsupported_and_bad_fields_are_422(router, fake, body, message):
    answer = await router.post("/v1/responses", json={"input": "the city", **body})
    await assert_refused(answer, "validation", message, fake)


async def test_the_client_raises_on_a_refused_field(api):
    with pytest.raises(UnprocessableEntityError):
        await api.responses.create(model="tiny", input="x", previous_response_id="resp_1")


async def test_a_json_schema_format_constrains_the_output(api, fake):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = {"format": {"type": "json_schema", "name": "thing", "schema": schema}}
    await api.responses.create(model="tiny", input="x", text=text, max_output_tokens=4)
    assert json.loads(fake.requests[-1].parameters.grammar) == schema


async def test_the_served_spec_describes_the_route(router):
    spec = await (await router.get("/openapi.json")).json()
    post = spec["paths"]["/v1/responses"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ResponsesRequest"
    )
    components = _as_json_schema(spec["components"])

    def check(instance: dict, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": components}
        jsonschema.validate(instance, schema)

    body = {"input": "the city", "instructions": "be brief"}
    check(body, "ResponsesRequest")
    check(await (await router.post("/v1/responses", json=body)).json(), "Response")
    answer = await router.post("/v1/responses", json={**body, "stream": True})
    for raw in (await answer.read()).decode().split("\n\n")[:-1]:
        check(json.loads(raw.split("\n")[1].removeprefix("data: ")), "ResponseStreamEvent")
