"""The request models' edges without a server: the 422 wording derived from a field's
declaration, the OpenAPI 3.0 form of their JSON schemas, and the Validator's token budget
(shared by every route and the offline LLM)."""

from __future__ import annotations

import re
from typing import Annotated

import pytest
from pydantic import BaseModel, Field

from shardline.router.errors import ValidationError
from shardline.router.schemas.common import StrictInt, openapi_components, parse
from shardline.router.schemas.tgi import CompatGenerateRequest, GenerateRequest
from shardline.router.tgi_params import tgi_sampling_params
from shardline.router.validation import ValidationLimits, Validator
from shardline.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("text", "the request body must be a JSON object"),
        ({}, "`inputs` is required and must be a string"),
        ({"inputs": 5}, "`inputs` must be a string (got 5)"),
        ({"inputs": "a", "parameters": 3}, "`parameters` must be a JSON object"),
        ({"inputs": "a", "parameters": {"top_k": True}}, "`top_k` must be int (got True)"),
        ({"inputs": "a", "parameters": {"top_k": 1.5}}, "`top_k` must be int"),
        ({"inputs": "a", "parameters": {"top_p": 1}}, "`top_p` must be > 0.0 and < 1.0 (got 1)"),
        ({"inputs": "a", "parameters": {"seed": 2**64}}, "`seed` must be >= 0 and <= 1844"),
        ({"inputs": "a", "parameters": {"stop": ["a", 1]}}, "`stop` must be list[str]"),
        ({"inputs": "a", "parameters": {"grammar": "json"}}, "`grammar` must be an object whose"),
        ({"inputs": "a", "parameters": {"early_stopping": "x"}}, "`early_stopping` must be true"),
        ({"inputs": "a", "stream": "yes"}, "`stream` must be bool"),
    ],
)
def test_a_422_names_the_field_as_declared(body, message):
    with pytest.raises(ValidationError) as caught:
        parse(CompatGenerateRequest, body)
    assert message in str(caught.value)


def test_null_parameters_are_absent_and_map_to_tgi_defaults():
    nulls = {"details": None, "temperature": None, "stop": None, "max_new_tokens": None}
    request = parse(GenerateRequest, {"inputs": "a", "parameters": nulls})
    assert request.generation.details is False and request.generation.stop == []
    params = tgi_sampling_params(request.generation)
    assert params.greedy and params.max_tokens is None and params.include_stop_str_in_output
    sampled = tgi_sampling_params(
        parse(GenerateRequest, {"inputs": "a", "parameters": {"top_k": 5}}).generation
    )
    assert sampled.temperature == 1.0 and sampled.top_k == 5  # a warper alone means sampling


class _Inner(BaseModel):
    title: str  # a property named like a JSON Schema keyword stays a property
    const: int = 0


class _Outer(BaseModel):
    inner: _Inner | None = None
    count: Annotated[StrictInt, Field(gt=0, lt=10)] | None = None
    kind: Annotated[str, Field(examples=["only"])] = "only"


def test_openapi_components_are_openapi_3_0():
    components = openapi_components({"Outer": _Outer})
    assert set(components) == {"Outer", "_Inner"}
    outer = components["Outer"]["properties"]
    assert outer["inner"]["allOf"] == [{"$ref": "#/components/schemas/_Inner"}]
    assert outer["inner"]["nullable"] is True and "anyOf" not in outer["inner"]
    assert outer["count"]["minimum"] == 0 and outer["count"]["exclusiveMinimum"] is True
    assert outer["count"]["maximum"] == 10 and outer["count"]["exclusiveMaximum"] is True
    assert outer["count"]["nullable"] is True and outer["kind"]["example"] == "only"
    assert set(components["_Inner"]["properties"]) == {"title", "const"}
    assert "title" not in components["Outer"]


def test_the_token_budget_is_resolved_in_one_place():
    validator = Validator(
        None, ValidationLimits(max_input_tokens=7, max_total_tokens=8, vocab_size=50)
    )
    try:
        assert validator.token_budget([1, 2, 3], SamplingParams(max_tokens=None)) == 5
        assert validator.token_budget([1, 2, 3], SamplingParams(max_tokens=2)) == 2
        cases = [
            (
                [1] * 3,
                SamplingParams(max_tokens=6),
                "`inputs` tokens + `max_new_tokens` must be <= 8",
            ),
            ([1] * 8, SamplingParams(max_tokens=None), "`inputs` must have less than 7 tokens"),
            ([1] * 6, SamplingParams(max_tokens=None, min_tokens=3), "`min_tokens` must be <="),
            ([60], SamplingParams(), "outside the model's vocabulary of 50"),
            ([1], SamplingParams(logit_bias={50: 1.0}), "`logit_bias` has token id 50"),
            ([], SamplingParams(), "`inputs` has no tokens"),
        ]
        for ids, params, message in cases:
            with pytest.raises(ValidationError, match=re.escape(message)):
                validator.token_budget(ids, params)
    finally:
        validator.close()
