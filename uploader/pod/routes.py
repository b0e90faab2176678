"""The pod's listeners: uploads on fixed paths, `/healthz`, `/metrics`.

Deckhouse's controller publishes the pod under a secret path that its ingress rewrites to
`/upload`, so the pod itself takes no token: every request to its upload paths is for
its one image. The handlers are the server's upload-URL handlers
(uploader/server/upload_api.py), given that image's token, so the pod answers what an
upload URL answers (HEAD offsets, `Content-Range` and tus resume, 422 for an invalid
image) plus what Deckhouse's binary answers: `GET` for readiness and 503 while another
upload runs.

Paths: `/upload` (Deckhouse's) and CDI's upload server's sync paths, `/v1beta1/upload`,
`/v1alpha1/upload` and their `-form` variants (a multipart body, the image in `file`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from importer.metrics import CONTENT_TYPE_LATEST, Metrics
from uploader.errors import ApiError, Conflict, error_middleware, status_response
from uploader.pod.tls import check_client_name
from uploader.server import upload_api
from uploader.server.cdi_api import UploadInProgress
from uploader.server.headdeadline import head_received_middleware
from uploader.server.lingering import lingering_close_middleware
from uploader.server.manifests import MAX_MANIFEST_SIZE
from uploader.server.upload_sessions import UploadSessions

UPLOAD_PATHS = (
    "/upload",
    "/v1beta1/upload",
    "/v1alpha1/upload",
    "/v1beta1/upload-form",
    "/v1alpha1/upload-form",
)
UPLOAD_TOKEN = web.AppKey("pod_upload_token", str)
CLIENT_NAME = web.AppKey("pod_client_name", str)
IN_FLIGHT = web.AppKey("pod_requests_in_flight", list[int])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _for_the_image(request: web.Request) -> None:
    """Checks the client (mTLS name) and points the request at the pod's one image."""
    check_client_name(request, request.app[CLIENT_NAME])
    request.match_info["token"] = request.app[UPLOAD_TOKEN]


def _busy(request: web.Request) -> ApiError | None:
    """Deckhouse's 503 while another request is delivering the image."""
    uploads: UploadSessions = request.app[upload_api.UPLOADS]
    image = uploads.lookup(request.app[UPLOAD_TOKEN])
    offset = uploads.delivering(image.key)
    if offset is None:
        return None
    return UploadInProgress(
        "another upload to this image is in progress; send it again once that one has "
        "ended, or continue it from HEAD's Upload-Offset if it broke off",
        offset=offset,
    )


async def _check_before_body(request: web.Request) -> web.StreamResponse | None:
    try:
        _for_the_image(request)
        busy = _busy(request)
    except ApiError as exc:
        return status_response(exc.code, exc.reason, exc.message, exc.headers)
    if busy is not None:
        return status_response(busy.code, busy.reason, busy.message, busy.headers)
    return await upload_api.check_before_body(request)


async def _upload(request: web.Request) -> web.StreamResponse:
    _for_the_image(request)
    try:
        if request.method == "POST":
            return await upload_api.post(request)
        return await upload_api.put(request)
    except Conflict:
        busy = _busy(request)
        if busy is not None:
            raise busy from None
        raise


def _looking(handler: Handler) -> Handler:
    async def look(request: web.Request) -> web.StreamResponse:
        _for_the_image(request)
        return await handler(request)

    return look


@web.middleware
async def _count_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts requests being answered: the pod exits once its verdict is answered."""
    counter = request.app[IN_FLIGHT]
    counter[0] += 1
    try:
        return await handler(request)
    finally:
        counter[0] -= 1


def uploads_app(uploads: UploadSessions, token: str, client_name: str) -> web.Application:
    app = web.Application(
        middlewares=[
            _count_in_flight,
            head_received_middleware,
            lingering_close_middleware,
            error_middleware,
        ],
        client_max_size=MAX_MANIFEST_SIZE,
    )
    app[upload_api.UPLOADS] = uploads
    app[UPLOAD_TOKEN] = token
    app[CLIENT_NAME] = client_name
    app[IN_FLIGHT] = [0]
    app.on_response_prepare.append(upload_api.close_after_answer)
    for path in UPLOAD_PATHS:
        for method in ("PUT", "POST", "PATCH"):
            app.router.add_route(method, path, _upload, expect_handler=_check_before_body)
        app.router.add_route("HEAD", path, _looking(upload_api.head))
        app.router.add_route("GET", path, _looking(upload_api.get))
        app.router.add_route("OPTIONS", path, _looking(upload_api.options))
    return app


def requests_in_flight(app: web.Application) -> int:
    return app[IN_FLIGHT][0]


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="OK")


def healthz_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", _healthz)
    return app


def metrics_app(metrics: Metrics) -> web.Application:
    async def render(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", render)
    app.router.add_get("/healthz", _healthz)
    return app
