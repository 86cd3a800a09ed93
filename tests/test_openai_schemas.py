"""The OpenAI request models (router/schemas/openai.py, responses.py) and their mapping onto
SamplingParams (router/openai_params.py), without a router: types, limits, nulls, precedence."""

from __future__ import annotations

import pytest

from shardline.router.errors import ValidationError
from shardline.router.openai_params import include_usage, requested_max_tokens, sampling_params
from shardline.router.schemas.openai import ChatRequest, CompletionRequest, parse_openai
from shardline.router.schemas.responses import ResponsesRequest
from shardline.router.validation import ValidationLimits

LIMITS = ValidationLimits(max_input_tokens=100, max_total_tokens=200, vocab_size=1000)
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _chat(**fields: object) -> ChatRequest:
    return parse_openai(ChatRequest, {**CHAT, **fields}, LIMITS)


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        (ChatRequest, [CHAT], "the request body must be a JSON object"),
        (ChatRequest, {}, "`messages` is required"),
        (ChatRequest, {**CHAT, "top_k": "5"}, "`top_k` must be int (got '5')"),
        (ChatRequest, {**CHAT, "top_k": 5.0}, "`top_k` must be int"),
        (ChatRequest, {**CHAT, "min_p": True}, "`min_p` must be a finite number"),
        (ChatRequest, {**CHAT, "stop": [1]}, "`stop` must be a string or a list of strings"),
        (ChatRequest, {**CHAT, "stop_token_ids": ["a"]}, "`stop_token_ids` must be a list of"),
        (ChatRequest, {**CHAT, "logprobs": 1}, "`logprobs` must be a boolean"),
        (ChatRequest, {**CHAT, "stream_options": {"x": 1}}, '`stream_options` must be {"inc'),
        (ChatRequest, {**CHAT, "tool_prompt": 3}, "`tool_prompt` must be"),
        (ChatRequest, {**CHAT, "n": True}, "`n` must be > 0 and <= 2 (--max-best-of). Given: True"),
        (CompletionRequest, {"prompt": "a", "best_of": 0}, "`best_of` must be > 0 and <= 2"),
        (CompletionRequest, {}, "`prompt` is required and must be a string or a list of"),
        (CompletionRequest, {"prompt": "a", "logprobs": -1}, "`logprobs` must be >= 0 and <= 5"),
        (ResponsesRequest, {}, "`input` is required"),
        (ResponsesRequest, {"input": "a", "max_output_tokens": 0}, "`max_output_tokens` must be"),
        (ResponsesRequest, {"input": "a", "instructions": 1}, "`instructions` must be a string"),
    ],
)
def test_a_field_of_the_wrong_type_is_a_422_naming_it(model, body, message):
    with pytest.raises(ValidationError) as refused:
        parse_openai(model, body, LIMITS)
    assert message in str(refused.value)
    assert refused.value.status == 422


def test_the_router_limits_come_from_the_validation_context():
    body = {**CHAT, "n": 3, "top_logprobs": 7}
    wider = ValidationLimits(100, 200, 1000, max_best_of=4, max_top_n_tokens=8)
    request = parse_openai(ChatRequest, body, wider)
    assert (request.n, request.top_logprobs) == (3, 7)
    with pytest.raises(ValidationError, match=r"`n` must be > 0 and <= 2 \(--max-best-of\)"):
        parse_openai(ChatRequest, body, LIMITS)


def test_nulls_are_absent_and_unknown_fields_ignored():
    request = _chat(temperature=None, n=None, temprature=0.5, stream=None)
    params = sampling_params(request, n=request.n or 1)
    assert (params.temperature, params.n, params.max_tokens) == (1.0, 1, None)
    assert not hasattr(request, "temprature")


def test_vllm_extras_reach_sampling_params_by_their_names():
    request = _chat(top_k=3, min_p=0.5, repetition_penalty=1.2, stop="x", ignore_eos=True)
    params = sampling_params(request, n=1)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (3, 0.5, 1.2)
    assert params.stop == ["x"] and params.ignore_eos


def test_ranges_are_sampling_params_own():
    with pytest.raises(ValidationError, match=r"`temperature` must be >= 0"):
        sampling_params(_chat(temperature=-1))


@pytest.mark.parametrize(
    ("model", "body", "budget"),
    [
        (ChatRequest, {**CHAT, "max_tokens": 5, "max_completion_tokens": 7}, 7),
        (ChatRequest, {**CHAT, "max_tokens": 5}, 5),
        (CompletionRequest, {"prompt": "a", "max_tokens": 4}, 4),
        (ResponsesRequest, {"input": "a", "max_output_tokens": 9}, 9),
        (ResponsesRequest, {"input": "a"}, None),
    ],
)
def test_one_token_budget_per_request(model, body, budget):
    request = parse_openai(model, body, LIMITS)
    assert requested_max_tokens(request) == budget
    assert sampling_params(request).max_tokens == budget


def test_stream_options_need_stream():
    assert include_usage(_chat(stream=True, stream_options={"include_usage": True}))
    assert not include_usage(_chat(stream_options={}))
    with pytest.raises(ValidationError, match="only allowed when `stream` is true"):
        include_usage(_chat(stream_options={"include_usage": False}))
