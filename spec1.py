import json, sys
sys.path.insert(0, "/tmp/mine")
from stage import stage

work = open("router/server.py").read()
def between(text, start, end):
    return text[text.index(start):text.index(end)]

server = [
    ("    context,\n    error_middleware,", "    context,\n    counting_failure,\n    error_middleware,"),
    ('''STATS_TIMEOUT_S = 2.0
OPEN_PATHS = frozenset({"/health", "/metrics"})  # served without the API key


def create_app(ctx: RouterContext) -> web.Application:
    app = web.Application(
        client_max_size=ctx.payload_limit,
        middlewares=[error_middleware, auth_middleware(ctx.api_key, OPEN_PATHS)],
    )''', '''STATS_TIMEOUT_S = 2.0
# Kubernetes' readiness probe times out after 1 s by default: /health answers within 2 s even
# when a shard does not answer its Health.
HEALTH_PROBE_TIMEOUT_S = 1.5
# Served without the API key; /metrics too with --metrics-without-auth.
OPEN_PATHS = frozenset({"/health"})


def create_app(ctx: RouterContext) -> web.Application:
    open_paths = OPEN_PATHS | {"/metrics"} if ctx.metrics_without_auth else OPEN_PATHS
    app = web.Application(
        client_max_size=ctx.payload_limit,
        middlewares=[error_middleware, auth_middleware(ctx.api_key, open_paths)],
    )'''),
    ("    return app\n\n\n# ---- generation", "    return app\n\n\n" + between(work, "def create_metrics_app", "# ---- generation") + "# ---- generation"),
]
head = open("/tmp/mine/server_head.py").read()
for name in ("async def _generate(request", "async def _generate_stream(request", "async def health(request"):
    end_marker = {"async def _generate(request": "async def _generate_stream(request",
                  "async def _generate_stream(request": "async def _write_events(",
                  "async def health(request": "async def metrics(request"}[name]
    old = between(head, name, end_marker)
    new_end = "async def live(request" if name == "async def health(request" else end_marker
    new = between(work, name, new_end)
    server.append((old, new))

batcher = [
    ('''        self._in_flight: set[asyncio.Future[tuple[StepResult, float]]] = set()''',
'''        # Shard calls in flight, each with the time.monotonic() it was sent at.
        self._in_flight: dict[asyncio.Future[tuple[StepResult, float]], float] = {}'''),
    ('''        self._in_flight.add(task)''','''        self._in_flight[task] = time.monotonic()'''),
    ('''            self._in_flight.discard(call.task)''','''            self._in_flight.pop(call.task, None)'''),
    ('''        calls, self._in_flight = self._in_flight, set()''','''        calls, self._in_flight = self._in_flight, {}'''),
    ('''    @property
    def running_size(self) -> int:''','''    @property
    def oldest_step_s(self) -> float:
        """Seconds the oldest Prefill or Decode in flight has run so far (0 when none)."""
        if not self._in_flight:
            return 0.0
        return time.monotonic() - min(self._in_flight.values())

    @property
    def running_size(self) -> int:'''),
]
s = stage("router/server.py", server)
stage("router/batcher.py", batcher)
open("/tmp/mine/server_staged.py", "w").write(s)
