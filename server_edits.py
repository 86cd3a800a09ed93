EDITS = [
('''"""TGI's REST routes over aiohttp: /generate, /generate_stream, /, /invocations, /info, /health,
/metrics, /tokenize and /openapi.json. Every error is `{"error", "error_type"}` with TGI's status.
''',
'''"""TGI's REST routes over aiohttp: /generate, /generate_stream, /, /invocations, /info, /health
(and its alias /ping), /v2/health/live, /metrics, /tokenize, /openapi.json and /docs (Swagger UI).
Every error is `{"error", "error_type"}` with TGI's status.
'''),
('from shardline.router.request_types import StreamEvent, Token, ValidRequest\n',
 'from shardline.router.request_types import StreamEvent, Token, ValidRequest\nfrom shardline.router.swagger_ui import swagger_ui\n'),
('OPEN_PATHS = frozenset({"/health", "/metrics"})  # served without the API key',
 '# Served without the API key: probes, metrics and the docs page.\nOPEN_PATHS = frozenset({"/health", "/ping", "/v2/health/live", "/metrics", "/docs"})'),
('''            web.get("/health", health),
''','''            web.get("/health", health),
            web.get("/ping", health),
            web.get("/v2/health/live", live),
'''),
('''            web.get("/openapi.json", openapi),
''','''            web.get("/openapi.json", openapi),
            web.get("/docs", swagger_ui),
'''),
('''async def metrics(request: web.Request) -> web.Response:
''','''async def live(request: web.Request) -> web.Response:
    """Liveness (KServe's route, as TGI serves it): answers while the router's event loop runs,
    asks no shard, so a long step or a drain never fails it. Readiness stays on /health."""
    return web.json_response({"live": True})


async def metrics(request: web.Request) -> web.Response:
'''),
]
