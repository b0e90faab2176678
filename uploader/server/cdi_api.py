"""KubeVirt CDI's upload protocol: `POST /v1beta1/upload` and its kin, as `virtctl
image-upload` and the OpenShift console send them to CDI's upload proxy.

The bearer token is the image's upload token, the last element of its upload URL. As in
CDI, each request carries the whole image from byte 0: a client that tries again sends it
all again, and that starts the upload over. The `-form` paths take a multipart/form-data
body with the image in the field `file`. The sync paths answer once the image is Ready;
the `-async` ones as soon as the body's last byte is in, while the image is still being
written (its status tells the rest), and answer `HEAD` with 200, which is how virtctl
learns that they exist.

The answers follow CDI's upload proxy and upload server: 400 without a well-formed
`Authorization: Bearer TOKEN`, 401 for a token no image waits with, 409 once the image is
Ready, 503 while another upload to it is in progress; a Failed image's token gets 410 with
the failure's reason, as its upload URL does. Like CDI's proxy, these paths answer
browsers of any origin (CORS): the console calls them from its own.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from importer.sources.reader import EMPTY, Reader
from uploader.errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    RequestTimeout,
    Unauthorized,
)
from uploader.server.cors import allow_any_origin, preflight_headers
from uploader.server.destinations import LengthRequired
from uploader.server.image_model import Image
from uploader.server.upload_api import (
    UPLOADS,
    RequestBody,
    close_after_answer,
    continue_unless_refused,
    multipart_file,
)
from uploader.server.upload_feed import BodyEnd
from uploader.server.upload_sessions import UploadPart, UploadSessions

# CDI's proxy takes these characters in a token; ours are URL-safe base64.
_BEARER = re.compile(r"Bearer\s+([A-Za-z0-9\-._~+/]+)", re.ASCII | re.IGNORECASE)
# What CDI's clone sources send; they stream a snappy-compressed clone, not an image.
CDI_CONTENT_TYPE = "X-CDI-Content-Type"
_CLONE_CONTENT_TYPES = frozenset({"filesystem-clone", "blockdevice-clone"})
_RUNNING = web.AppKey("cdi_uploads_running", set[asyncio.Task[object]])


class UploadInProgress(ApiError):
    """CDI's answer to an upload that arrives while another one to the image runs."""

    code = 503
    reason = "ServiceUnavailable"


@dataclass(frozen=True)
class CdiPath:
    """One of CDI's upload paths."""

    path: str
    form: bool  # multipart/form-data, the image in the field "file"
    asynchronous: bool  # answers once the bytes are in, not once the image is Ready


def cdi_paths() -> list[CdiPath]:
    """Every path CDI's upload proxy serves, v1beta1 and the older v1alpha1."""
    return [
        CdiPath(
            f"/{version}/upload{'-form' if form else ''}{'-async' if asynchronous else ''}",
            form,
            asynchronous,
        )
        for version in ("v1beta1", "v1alpha1")
        for form in (False, True)
        for asynchronous in (False, True)
    ]


_PATHS = frozenset(p.path for p in cdi_paths())


def _bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if header is None:
        raise BadRequest(
            "send the image's upload token: Authorization: Bearer TOKEN, where TOKEN is the "
            "last part of its upload URL (status.imageUploadURLs)"
        )
    match = _BEARER.fullmatch(header.strip())
    if match is None:
        raise BadRequest(
            'the Authorization header must be "Bearer TOKEN", TOKEN being the last part of '
            "the image's upload URL"
        )
    return match.group(1)


def _find(uploads: UploadSessions, token: str) -> Image:
    """The image the token uploads to; a token no image waits with is CDI's 401."""
    try:
        return uploads.find(token)
    except NotFound:
        raise Unauthorized(
            "no image waits for an upload with this token (wrong or expired): use the last "
            "part of the image's upload URL (status.imageUploadURLs)"
        ) from None


def _busy(uploads: UploadSessions, token: str) -> ApiError:
    """The answer to a Conflict from the sessions: the image's own answer when it changed
    meanwhile (Ready, Failed, gone), else CDI's "upload in progress"."""
    _find(uploads, token)
    return UploadInProgress(
        "another upload to this image is in progress; send it again once that one has ended"
    )


def _part(request: web.Request, where: CdiPath, body: Reader) -> UploadPart:
    """The whole image from byte 0, the length known unless the body is a form or chunked."""
    if request.headers.get(CDI_CONTENT_TYPE, "").strip().lower() in _CLONE_CONTENT_TYPES:
        raise BadRequest(f"{CDI_CONTENT_TYPE}: CDI's clone streams are not taken here")
    multipart = request.content_type == "multipart/form-data"
    if where.form and not multipart:
        raise BadRequest(
            f"{where.path} takes a multipart/form-data body with the image in the field "
            f'"file" (curl -F file=@FILE); send a bare body to {where.path.replace("-form", "")}'
        )
    if multipart and not where.form:
        raise BadRequest(
            f"a multipart/form-data body goes to {where.path.replace('/upload', '/upload-form')}"
        )
    length = request.content_length
    return UploadPart(body, 0, None if where.form else length, True, _restart, length=length)


def _restart(offset: int) -> ApiError:
    # A whole image always starts at 0; only a race with another upload gets here.
    return UploadInProgress("another upload to this image is in progress", offset=offset)


def _admit(
    request: web.Request, uploads: UploadSessions, where: CdiPath, body: Reader = EMPTY
) -> tuple[str, UploadPart, Image]:
    """Everything that can be checked before the body: the header (400), the token (401,
    409, 410), the body's kind (400), its size (413) and the image's state (503, 411)."""
    token = _bearer_token(request)
    _find(uploads, token)
    part = _part(request, where, body)
    try:
        image = uploads.admit(token, part)
    except Conflict:
        raise _busy(uploads, token) from None
    except LengthRequired:
        if not where.form:
            raise
        bare = where.path.replace("-form", "")
        raise LengthRequired(
            "a form does not give the file's length, which ContainerRegistry storage needs "
            f"before the first byte: POST the file as the body of {bare} (virtctl "
            "image-upload does), or use PersistentVolumeClaim storage"
        ) from None
    return token, part, image


class _Arrival:
    """A request body that tells when its last byte has been taken."""

    def __init__(self, body: RequestBody) -> None:
        self.body = body
        self.all_in = asyncio.Event()

    async def readinto(self, view: memoryview) -> int:
        n = await self.body.readinto(view)
        # A body of known length is not read again once the image is complete.
        if n == 0 or (self.body.length is not None and self.body.received >= self.body.length):
            self.all_in.set()
        return n


def _retrieve(running: set[asyncio.Task[object]]) -> Callable[[asyncio.Task[object]], None]:
    def done(task: asyncio.Task[object]) -> None:
        running.discard(task)
        if not task.cancelled():
            task.exception()  # the outcome is in the image's status

    return done


async def _receive(
    uploads: UploadSessions, token: str, part: UploadPart, body: RequestBody
) -> tuple[BodyEnd, Image | None]:
    try:
        return await uploads.receive(token, part)
    except Conflict:
        raise _busy(uploads, token) from None
    finally:
        body.release()


def _json(answer: dict[str, object]) -> web.Response:
    return web.Response(text=json.dumps(answer) + "\n", content_type="application/json")


def _outcome(
    uploads: UploadSessions, how: BodyEnd, done: Image | None, received: int
) -> web.Response:
    if how is BodyEnd.IDLE:
        raise RequestTimeout(
            f"nothing arrived for {uploads.config.upload_idle_timeout:g} s; send the image again",
            headers={"Connection": "close"},
        )
    if how is BodyEnd.TAKEN_OVER:
        raise UploadInProgress("a newer upload to this image took over from this one")
    if how is not BodyEnd.COMPLETE or done is None:
        raise BadRequest(
            f"the upload broke off after {received} bytes; send the image again",
            headers={"Connection": "close"},
        )
    return _json(uploads.state(done).to_json())


def _phase_now(uploads: UploadSessions, token: str, image: Image) -> str | None:
    try:
        return uploads.lookup(token).phase
    except ApiError:  # it failed meanwhile: its status says why
        return image.phase


async def _upload(request: web.Request, where: CdiPath) -> web.Response:
    uploads = request.app[UPLOADS]
    body = RequestBody(request, multipart_file(request) if where.form else None)
    arrival = _Arrival(body)
    token, part, image = _admit(request, uploads, where, arrival)
    receipt = asyncio.ensure_future(_receive(uploads, token, part, body))
    if where.asynchronous:
        arrived = asyncio.ensure_future(arrival.all_in.wait())
        try:
            await asyncio.wait({receipt, arrived}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrived.cancel()
        if not receipt.done():
            body.release()
            running = request.app[_RUNNING]
            running.add(receipt)
            receipt.add_done_callback(_retrieve(running))
            phase = _phase_now(uploads, token, image)
            return _json({"phase": phase, "offset": body.received})
    how, done = await receipt
    return _outcome(uploads, how, done, body.received)


async def _probe(request: web.Request) -> web.Response:
    """virtctl's HEAD on an async path: 200 says it may upload there."""
    _find(request.app[UPLOADS], _bearer_token(request))
    return web.Response(status=200)


def _allowed(where: CdiPath) -> str:
    return "HEAD, OPTIONS, POST" if where.asynchronous else "OPTIONS, POST"


def _preflight(where: CdiPath) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def options(request: web.Request) -> web.Response:
        return web.Response(status=204, headers=preflight_headers(request, _allowed(where)))

    return options


def _check_before_body(where: CdiPath) -> Callable[[web.Request], Awaitable[web.Response | None]]:
    async def check(request: web.Request) -> web.Response | None:
        """Refuses a request before its body is sent, when the client waits for
        `100 Continue` (curl does for large bodies; Go's client does not ask)."""
        return continue_unless_refused(
            request, lambda: _admit(request, request.app[UPLOADS], where)
        )

    return check


def _handler(where: CdiPath) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def upload(request: web.Request) -> web.Response:
        return await _upload(request, where)

    return upload


def add_routes(app: web.Application) -> None:
    """CDI's paths on the uploads' application (which holds `UPLOADS`)."""
    app[_RUNNING] = set()
    if close_after_answer not in app.on_response_prepare:
        app.on_response_prepare.append(close_after_answer)
    app.on_response_prepare.append(allow_any_origin(lambda request: request.path in _PATHS))
    for where in cdi_paths():
        app.router.add_route(
            "POST", where.path, _handler(where), expect_handler=_check_before_body(where)
        )
        if where.asynchronous:
            app.router.add_route("HEAD", where.path, _probe)
        app.router.add_route("OPTIONS", where.path, _preflight(where))
