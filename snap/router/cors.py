"""CORS (`--cors-allow-origin`): which web origins browsers let call the API, as TGI's layer
does (GET and POST, with the JSON content type and a bearer token). Preflights are answered
ahead of authentication; without origins nothing is added and browsers keep the same-origin
rule."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

ANY_ORIGIN = "*"
_PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST",
    "Access-Control-Allow-Headers": "content-type, authorization",
}


def enable_cors(app: web.Application, origins: Sequence[str]) -> None:
    """Answers preflights from `origins` (`*`: any) and marks every answer to them as allowed."""
    if not origins:
        return
    allowed = frozenset(origins)

    def allowed_origin(request: web.BaseRequest) -> str | None:
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        if ANY_ORIGIN in allowed:
            return ANY_ORIGIN
        return origin if origin in allowed else None

    @web.middleware
    async def preflight(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        is_preflight = (
            request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        )
        if is_preflight and allowed_origin(request) is not None:
            return web.Response(status=200, headers=_PREFLIGHT_HEADERS)
        return await handler(request)

    async def allow(request: web.BaseRequest, response: web.StreamResponse) -> None:
        origin = allowed_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            if origin != ANY_ORIGIN:
                response.headers["Vary"] = "Origin"

    app.middlewares.insert(0, preflight)
    app.on_response_prepare.append(allow)
