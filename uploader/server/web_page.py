"""The web page of the API listener: `/` and its static files, shipped in the package
(uploader/server/web/), with no build step and nothing fetched from elsewhere.

The page reads and changes images through the same API as the command line, with the
same bearer token when access control is on (it asks for one and keeps it for the tab's
session only); serving the page itself needs no token, since it holds no data.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

WEB_DIR = Path(__file__).resolve().parent / "web"
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src *; img-src 'self' data:; frame-ancestors 'none'"
    ),
}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers=_HEADERS)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static("/ui/", WEB_DIR, show_index=False, follow_symlinks=False)
