EDITS = [
('''            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "200 when every shard answers",
                    "responses": {
                        "200": {"description": "Healthy"},
                        "503": {
                            "description": "A shard does not answer",
                            "content": {"application/json": {"schema": _ref("ErrorResponse")}},
                        },
                    },
                }
            },
''','''            "/health": _health("health", "200 when every shard answers"),
            "/ping": _health("ping", "TGI's alias of /health (SageMaker's health check)"),
            "/v2/health/live": _get(
                "kserve_health_live",
                "Liveness: the router answers (asks no shard)",
                {
                    "type": "object",
                    "required": ["live"],
                    "properties": {"live": {"type": "boolean"}},
                },
            ),
            "/docs": {
                "get": {
                    "operationId": "swagger_ui",
                    "summary": "Swagger UI over /openapi.json",
                    "responses": {
                        "200": {
                            "description": "HTML page",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
'''),
('''def _get(operation: str, summary: str, schema: dict[str, Any]) -> dict[str, Any]:
''','''def _health(operation: str, summary: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "responses": {
                "200": {"description": "Healthy"},
                "503": {
                    "description": "A shard does not answer",
                    "content": {"application/json": {"schema": _ref("ErrorResponse")}},
                },
            },
        }
    }


def _get(operation: str, summary: str, schema: dict[str, Any]) -> dict[str, Any]:
'''),
]
