import asyncio, json, pathlib, tempfile
from aiohttp.test_utils import TestClient
from tests.router_fixtures import RouterTestServer
from shardline.router.server import create_app
from shardline.router.startup import RouterSettings, start_router
from tests.test_router_fakes import FakeShardClient, fixed_script, tiny_tokenizer

async def main():
    tok = tiny_tokenizer(pathlib.Path(tempfile.mkdtemp()))
    fake = FakeShardClient(fixed_script(tok), tok.eos_token_id)
    ctx = await start_router(fake, tok, RouterSettings(model_id="tiny", max_total_tokens=128))
    client = TestClient(RouterTestServer(create_app(ctx), handler_cancellation=True))
    await client.start_server()
    deep = "[" * 100000 + "]" * 100000
    cases = {
      "tool args deep": ("/v1/chat/completions", {"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"","tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":deep}}]},{"role":"user","content":"b"}], "max_tokens": 2}),
      "grammar json deep string": ("/generate", {"inputs":"a","parameters":{"grammar":{"type":"json","value":deep}, "max_new_tokens": 2}}),
      "response_format schema deep-ish": ("/v1/chat/completions", {"messages":[{"role":"user","content":"a"}], "response_format":{"type":"json_schema","json_schema":{"name":"x","schema": json.loads('{"type":"object","properties":{"a":' * 60 + '{"type":"string"}' + '}}' * 60)}}, "max_tokens": 2}),
      "regex grammar deep parens": ("/generate", {"inputs":"a","parameters":{"grammar":{"type":"regex","value":"("*5000 + "a" + ")"*5000}, "max_new_tokens": 2}}),
      "tool params deep": ("/v1/chat/completions", {"messages":[{"role":"user","content":"a"}], "tools":[{"type":"function","function":{"name":"f","parameters": json.loads('{"type":"object","properties":{"a":' * 60 + '{"type":"string"}' + '}}' * 60)}}], "max_tokens": 2}),
    }
    for name, (path, body) in cases.items():
        try:
            r = await asyncio.wait_for(client.post(path, json=body), 60)
            print(name, r.status, (await r.text())[:200])
        except Exception as e:
            print(name, "EXC", repr(e)[:200])
    await client.close(); await ctx.batcher.stop()
asyncio.run(main())
