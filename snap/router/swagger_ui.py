"""`GET /docs`: Swagger UI over the server's own `/openapi.json`, as TGI serves it. The page loads
swagger-ui from a CDN (the browser fetches it, the server ships nothing)."""

from __future__ import annotations

from aiohttp import web

SWAGGER_UI_VERSION = "5.17.14"
_CDN = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}"
SPEC_URL = "/openapi.json"

_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Shardline - Swagger UI</title>
  <link rel="stylesheet" href="{_CDN}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{_CDN}/swagger-ui-bundle.js" crossorigin="anonymous"></script>
  <script>
    window.ui = SwaggerUIBundle({{url: "{SPEC_URL}", dom_id: "#swagger-ui", deepLinking: true}});
  </script>
</body>
</html>
"""


async def swagger_ui(request: web.Request) -> web.Response:
    return web.Response(text=_PAGE, content_type="text/html")
