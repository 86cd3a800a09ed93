"""`--cors-allow-origin`: browsers from the listed origins may call the API (preflights answered
ahead of the API key, streams marked too); other origins, and any without the flag, get no CORS
headers."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from shardline.router.server import create_app
from shardline.router.startup import RouterSettings, start_router

ALLOWED = "https://app.example"
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}
BODY = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}


async def _client(fake, tokenizer, origins: list[str], api_key: str | None = None) -> TestClient:
    settings = RouterSettings(model_id="tiny", max_total_tokens=128, api_key=api_key)
    ctx = await start_router(fake, tokenizer, settings)
    client = TestClient(TestServer(create_app(ctx, origins), handler_cancellation=True))
    await client.start_server()
    client.app_context = ctx
    return client


async def _close(client: TestClient) -> None:
    await client.close()
    await client.app_context.batcher.stop()


async def test_a_listed_origin_gets_its_preflight_before_the_api_key(fake, tokenizer) -> None:
    client = await _client(fake, tokenizer, [ALLOWED], api_key="secret")
    try:
        preflight = await client.options("/generate", headers={"Origin": ALLOWED, **PREFLIGHT})
        assert preflight.status == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
        headers = {"Origin": ALLOWED, "Authorization": "Bearer secret"}
        stream = await client.post("/generate_stream", json=BODY, headers=headers)
        assert stream.status == 200 and stream.headers["Access-Control-Allow-Origin"] == ALLOWED
        await stream.read()
        refused = await client.post("/generate", json=BODY, headers={"Origin": ALLOWED})
        assert refused.status == 401
        assert refused.headers["Access-Control-Allow-Origin"] == ALLOWED
        other = {"Origin": "https://evil.example", **PREFLIGHT}
        assert (
            "Access-Control-Allow-Origin"
            not in (await client.options("/generate", headers=other)).headers
        )
    finally:
        await _close(client)


async def test_any_origin_with_a_star_and_none_without_the_flag(fake, tokenizer) -> None:
    for origins, expected in (["*"], "*"), ([], None):
        client = await _client(fake, tokenizer, origins)
        try:
            answer = await client.post("/generate", json=BODY, headers={"Origin": ALLOWED})
            assert answer.status == 200
            assert answer.headers.get("Access-Control-Allow-Origin") == expected
        finally:
            await _close(client)
