"""The API docs page (/docs): Swagger UI served from the installed ``swagger-ui-bundle-v2``
package and this node's own init script, never from a CDN (a hospital LAN may have no
internet, and a CDN script would run with this origin's rights). ReDoc and the OAuth2
redirect page are off: both need a CDN or inline script.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

STATIC = Path(__file__).resolve().parents[1] / "web" / "static"
#: Swagger UI's files, by the name the page asks for
_FILES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
}

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - API docs</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/static/docs-init.js"></script>
</body></html>
"""


def swagger_ui_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def docs_router(title: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    page = PAGE.format(title=title.replace("<", "").replace("&", ""))

    @router.get("/docs")
    def docs() -> HTMLResponse:
        return HTMLResponse(page)

    @router.get("/docs/static/{name}")
    def static(name: str) -> Response:
        if name == "docs-init.js":
            return FileResponse(STATIC / name, media_type="text/javascript; charset=utf-8")
        if name not in _FILES:
            return Response(status_code=404)
        return FileResponse(swagger_ui_dir() / name, media_type=_FILES[name])

    return router
