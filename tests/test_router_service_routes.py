"""The routes a platform calls besides the API: /docs (Swagger UI, as TGI), the liveness route
(/v2/health/live, TGI's KServe route: the process only) against readiness (/health and TGI's
alias /ping, which ask the shards), all open under --api-key as TGI has them."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from shardline.router.swagger_ui import SPEC_URL
from tests.fake_shard import router_client
from tests.router_assertions import assert_error

PROBES = ("/health", "/ping", "/v2/health/live")


class _Assets(HTMLParser):
    """The scripts and stylesheets a page loads."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script" and values.get("src"):
            self.urls.append(values["src"])
        if tag == "link" and values.get("rel") == "stylesheet":
            self.urls.append(values["href"])


async def test_docs_is_a_swagger_ui_page_over_the_servers_own_spec(router):
    answer = await router.get("/docs")
    assert answer.status == 200
    assert answer.content_type == "text/html"
    page = await answer.text()
    assets = _Assets()
    assets.feed(page)
    assert {url.rsplit("/", 1)[1] for url in assets.urls} == {
        "swagger-ui.css",
        "swagger-ui-bundle.js",
    }
    assert all(re.match(r"https://\S+/swagger-ui-dist@\d+\.\d+\.\d+/", url) for url in assets.urls)
    assert re.search(rf'SwaggerUIBundle\(\{{url: "{re.escape(SPEC_URL)}"', page)
    spec = await (await router.get(SPEC_URL)).json()
    assert spec["openapi"].startswith("3.") and "/generate" in spec["paths"]
    assert {"/docs", *PROBES} <= set(spec["paths"])


async def test_liveness_answers_while_the_shards_do_not(router, fake):
    for path in PROBES:
        assert (await router.get(path)).status == 200, path
    assert await (await router.get("/v2/health/live")).json() == {"live": True}
    fake.healthy = False
    for path in ("/health", "/ping"):
        answer = await router.get(path)
        assert answer.status == 503, path
        assert_error(await answer.json(), "healthcheck")
    assert (await router.get("/v2/health/live")).status == 200


async def test_liveness_stays_up_while_draining(tokenizer, fake):
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128)
    try:
        await ctx.drain(timeout_s=1)
        assert (await client.get("/health")).status == 503
        assert (await client.get("/v2/health/live")).status == 200
    finally:
        await client.close()
        await ctx.batcher.stop()


async def test_probes_and_docs_need_no_api_key_as_in_tgi(tokenizer, fake):
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128, api_key="s3cret")
    try:
        for path in ("/docs", *PROBES):
            assert (await client.get(path)).status == 200, path
        assert (await client.post("/generate", json={"inputs": "a"})).status == 401
    finally:
        await client.close()
        await ctx.batcher.stop()
