"""logit_bias on both OpenAI routes and TGI's watermark on /generate: what the router accepts
reaches the shard message, what it refuses is a 422 in TGI's error JSON before any shard call."""

from __future__ import annotations

import pytest

from tests.openai_route_helpers import USER
from tests.router_assertions import assert_error


async def test_the_official_client_passes_logit_bias_on_both_routes(api, fake):
    await api.chat.completions.create(
        model="m", messages=USER, max_tokens=2, logit_bias={"17": 100, "5": -100}
    )
    assert dict(fake.requests[-1].parameters.logit_bias) == {17: 100.0, 5: -100.0}
    await api.completions.create(model="m", prompt="a", max_tokens=2, logit_bias={"383": 2.5})
    assert dict(fake.requests[-1].parameters.logit_bias) == {383: 2.5}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    ("logit_bias", "message"),
    [
        ({"384": 1}, "`logit_bias` has token id 384, outside the model's vocabulary"),
        ({"-1": 1}, "`logit_bias` keys must be token ids"),
        ({"the": 1}, "`logit_bias` keys must be token ids"),
        ({"5": 101}, "values must be in [-100, 100]"),
        ({"5": -100.5}, "values must be in [-100, 100]"),
        ({"5": "high"}, "`logit_bias` must be a finite number"),
        ([5], "`logit_bias` must be an object"),
    ],
)
async def test_bad_logit_bias_is_422(router, fake, path, logit_bias, message):
    body = {"messages": USER, "prompt": "a", "max_tokens": 2, "logit_bias": logit_bias}
    answer = await router.post(path, json=body)
    error = await answer.json()
    assert answer.status == 422, error
    assert_error(error, "validation")
    assert message in error["error"]
    assert not fake.requests


async def test_generate_takes_tgi_watermark(router, fake):
    body = {"inputs": "the city", "parameters": {"max_new_tokens": 2, "watermark": True}}
    answer = await router.post("/generate", json=body)
    assert answer.status == 200, await answer.text()
    assert fake.requests[-1].parameters.watermark
    answer = await router.post("/generate", json={"inputs": "a", "parameters": {}})
    assert answer.status == 200 and not fake.requests[-1].parameters.watermark
    bad = {"inputs": "a", "parameters": {"watermark": True, "use_beam_search": True}}
    answer = await router.post("/generate", json={**bad, "parameters": {**bad["parameters"]}})
    assert answer.status == 422
