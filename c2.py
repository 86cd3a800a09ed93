import json
spec = {"whole": ["tests/test_tracing.py"], "edits": {}}
spec["edits"]["router/batcher.py"] = [
['''            block_size=self.config.block_size,
        )
        self._queue.append(entry)
''', '''            block_size=self.config.block_size,
        )
        entry.trace = tracing.entry_trace(entry)
        self._queue.append(entry)
'''],
['''            if entry.batched_at is None:
                entry.batched_at = now
                self._metrics.request_queue_duration.observe(now - entry.queued_at)
''', '''            if entry.batched_at is None:
                entry.batched_at = now
                self._metrics.request_queue_duration.observe(now - entry.queued_at)
            if entry.trace is not None:
                entry.trace.prefill_sent(len(entries), entry.chunk)
'''],
['''            if not entry.chunked:
                self._running[request_id] = entry
            entry.prefilled += entry.chunk
''', '''            if not entry.chunked:
                self._running[request_id] = entry
            if entry.trace is not None:
                entry.trace.prefill_answered(prompt_done=not entry.chunked)
            entry.prefilled += entry.chunk
'''],
['''        seq.done = True
        return Finished(
''', '''        seq.done = True
        if entry.trace is not None:
            entry.trace.finish_reasons.append(reason.value)
        return Finished(
'''],
['''            if entry.alive:
                entry.done = True
                entry.events.put_nowait(error)
''', '''            if entry.alive:
                entry.done = True
                entry.events.put_nowait(error)
                if entry.trace is not None:
                    entry.trace.close(error)
'''],
['''    def _record_success(self, entry: Entry) -> None:
        metrics = self._metrics
''', '''    def _record_success(self, entry: Entry) -> None:
        if entry.trace is not None:
            entry.trace.close()
        metrics = self._metrics
'''],
['''from shardline.proto import generate_pb2 as pb
''', '''from shardline.proto import generate_pb2 as pb
from shardline.router import tracing
'''],
]
spec["edits"]["router/server.py"] = [
['''    app = web.Application(
        client_max_size=ctx.payload_limit,
        middlewares=[error_middleware, auth_middleware(ctx.api_key, open_paths)],
    )
    app[CONTEXT] = ctx
''', '''    app = web.Application(
        client_max_size=ctx.payload_limit,
        middlewares=[
            *tracing.middlewares(),
            error_middleware,
            auth_middleware(ctx.api_key, open_paths),
        ],
    )
    enable_cors(app, cors_allow_origins)
    app[CONTEXT] = ctx
'''],
['''def create_app(ctx: RouterContext) -> web.Application:''', '''def create_app(ctx: RouterContext, cors_allow_origins: Sequence[str] = ()) -> web.Application:'''],
['''

async def _validate(
    ctx: RouterContext, body: Any, stream: bool
) -> tuple[ValidRequest, ResponseOptions]:
''', '''

@tracing.traced("validation")
async def _validate(
    ctx: RouterContext, body: Any, stream: bool
) -> tuple[ValidRequest, ResponseOptions]:
'''],
['''from shardline.router.errors import (
''', '''from shardline.router import tracing
from shardline.router.cors import enable_cors
from shardline.router.errors import (
'''],
['''import time
from typing import Any
''', '''import time
from collections.abc import Sequence
from typing import Any
'''],
]
spec["edits"]["router/cli.py"] = [
['''    add("--json-output", action="store_true", help="log JSON lines")
''', '''    add("--json-output", action="store_true", help="log JSON lines")
    add("--otlp-endpoint", help="OTLP/gRPC collector sent a trace of each request")
    add("--otlp-service-name", default=tracing.DEFAULT_SERVICE_NAME)
    add(
        "--cors-allow-origin",
        action="append",
        default=[],
        help="origin browsers may call the API from (repeat it; * for any)",
    )
'''],
['''    ctx = await start_router(client, tokenizer, settings_from_args(args))
    runner = RouterRunner(
        create_app(ctx),
''', '''    ctx = await start_router(client, tokenizer, settings_from_args(args))
    tracing.configure(args.otlp_endpoint, args.otlp_service_name)
    runner = RouterRunner(
        create_app(ctx, args.cors_allow_origin),
'''],
['''    ctx.validator.close()
    await client.close()
    return 1 if stuck else 0
''', '''    ctx.validator.close()
    await client.close()
    tracing.shutdown()
    return 1 if stuck else 0
'''],
['''from shardline.router.batcher import Batcher
''', '''from shardline.router import tracing
from shardline.router.batcher import Batcher
'''],
]
json.dump(spec, open("/tmp/mine/c2.json", "w"))
