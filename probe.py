import asyncio
from tests.router_fixtures import RouterTestServer
from aiohttp.test_utils import TestClient
from shardline.router.server import create_app
from shardline.router.startup import RouterSettings, start_router
from tests.test_router_fakes import FakeShardClient, fixed_script, tiny_tokenizer
import tempfile, pathlib

async def raw(host, port, data):
    r, w = await asyncio.open_connection(host, port)
    w.write(data); await w.drain()
    out = await asyncio.wait_for(r.read(4096), 5)
    w.close()
    return out

async def main():
    tok = tiny_tokenizer(pathlib.Path(tempfile.mkdtemp()))
    fake = FakeShardClient(fixed_script(tok), tok.eos_token_id)
    ctx = await start_router(fake, tok, RouterSettings(model_id="tiny", max_total_tokens=128))
    client = TestClient(RouterTestServer(create_app(ctx), handler_cancellation=True))
    await client.start_server()
    h, p = client.server.host, client.server.port
    cases = {
      "garbage": b"GARBAGE\r\n\r\n",
      "bad version": b"POST /generate HTTP/9.9\r\n\r\n",
      "long header": b"POST /generate HTTP/1.1\r\nHost: x\r\nX-A: " + b"a"*10000 + b"\r\n\r\n",
      "bad chunk": b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n",
      "short body": b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}",
      "CL+TE": b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
      "big CL": b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99999999\r\n\r\n{}",
      "405": b"GET /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
      "many headers": b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n",
    }
    for name, data in cases.items():
        try:
            out = await asyncio.wait_for(raw(h, p, data), 5)
        except Exception as e:
            out = repr(e).encode()
        print(name, "->", out[:400].replace(b"\r\n", b" | "))
    await client.close(); await ctx.batcher.stop()
asyncio.run(main())
