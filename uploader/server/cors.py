"""Cross-origin access to the upload listener's paths.

The upload URLs and CDI's paths answer browsers of any origin: the web page served by a
separate `--api-listen` listener, the OpenShift console, an Uppy page on another site.
That is safe because these paths take no cookies or ambient credentials: the upload token
in the URL (or CDI's bearer header, which a browser only sends when the page sets it) is
the whole authority, so `Access-Control-Allow-Origin: *` gives a page nothing it did not
already hold.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

# How long a browser may keep a preflight's answer.
PREFLIGHT_MAX_AGE = "600"
# What a resumable upload's script must be able to read from an answer.
EXPOSED_HEADERS = ", ".join(
    (
        "Upload-Offset",
        "Upload-Length",
        "Upload-Defer-Length",
        "Tus-Resumable",
        "Tus-Version",
        "Tus-Extension",
        "Tus-Max-Size",
        "Location",
    )
)


def preflight_headers(request: web.Request, allowed: str) -> dict[str, str]:
    """The answer's headers to an OPTIONS that allows `allowed` methods: the preflight's
    when a browser asks for one."""
    headers = {"Allow": allowed}
    if "Origin" in request.headers and "Access-Control-Request-Method" in request.headers:
        headers["Access-Control-Allow-Methods"] = allowed
        asked = request.headers.get("Access-Control-Request-Headers")
        if asked:
            headers["Access-Control-Allow-Headers"] = asked
        headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        headers["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    return headers


def allow_any_origin(
    applies: Callable[[web.Request], bool],
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An `on_response_prepare` hook: the answers of the paths `applies` to may be read by
    pages of any origin."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        if "Origin" in request.headers and applies(request):
            response.headers["Access-Control-Allow-Origin"] = "*"
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS

    return hook
