"""The upload URLs: `/upload/{token}` (README: "API").

The token is checked when the request starts, before `100 Continue` is sent, so a
mistyped URL is refused before a single byte of a big body moves.

Besides PUT (curl), multipart POST (forms) and tus PATCH, the URL answers tus 1.0's
`creation`, `creation-defer-length` and `creation-with-upload`: a POST with
`Upload-Length` (or `Upload-Defer-Length: 1`) declares the upload's length and answers 201
with the URL itself as `Location`, so tus clients given the URL as their endpoint
(tus-js-client, Uppy, tuspy) create there and then PATCH there; a body
(`application/offset+octet-stream`) is the upload's first bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from importer.errors import TransferError, TransferInterrupted
from importer.sources.reader import EMPTY, ChunkReader, Reader
from importer.sources.transportbody import TransportBody, body_reader
from uploader.errors import (
    TUS_VERSION,
    ApiError,
    BadRequest,
    Conflict,
    RangeNotSatisfiable,
    RequestTimeout,
    UnsupportedMediaType,
    offset_headers,
    status_response,
)
from uploader.quoting import quoted
from uploader.server.cors import allow_any_origin, preflight_headers
from uploader.server.image_model import Image
from uploader.server.lingering import linger_after_answer
from uploader.server.upload_feed import BodyEnd
from uploader.server.upload_sessions import UploadPart, UploadSessions

UPLOADS = web.AppKey("uploads", UploadSessions)
READ_CHUNK = 1 << 20
_CLOSE_AFTER_ANSWER = "upload.close_after_answer"
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)", re.ASCII)
_NUMBER = re.compile(r"[0-9]+", re.ASCII)
# More digits than any number of bytes anybody means (a yottabyte has 25): refused unread.
MAX_DIGITS = 30
_PAYLOAD_ERRORS = (
    ConnectionError,
    asyncio.IncompleteReadError,
    aiohttp.ClientPayloadError,
    HttpProcessingError,
)


def _uploads(request: web.Request) -> UploadSessions:
    return request.app[UPLOADS]


class RequestBody:
    """A request's body as the upload's feed reads it; a sender that goes away early is a
    TransferInterrupted.

    A body of known length from 1 MiB up (`TAKEOVER_MIN`) is received straight into the
    pipeline's blocks (`TransportBody`); its connection then closes after the answer, since
    aiohttp cannot parse another request on it. Smaller bodies (tus clients send many) keep their
    connection alive; they, chunked bodies and multipart forms are read through aiohttp.
    """

    def __init__(self, request: web.Request, pieces: AsyncIterable[bytes] | None = None) -> None:
        self._request = request
        self._pieces = pieces
        self.length = None if pieces is not None else request.content_length
        self.received = 0
        self._reader: Reader | None = None

    def _open(self) -> Reader:
        if self._pieces is not None:
            return ChunkReader(self._pieces)
        request = self._request
        reader = body_reader(request.content, request.transport, self.length)
        if isinstance(reader, TransportBody):
            request[_CLOSE_AFTER_ANSWER] = True
        return reader

    async def readinto(self, view: memoryview) -> int:
        if self._reader is None:
            self._reader = self._open()
        try:
            n = await self._reader.readinto(view)
        except _PAYLOAD_ERRORS as exc:
            raise TransferInterrupted(
                f"the upload was interrupted after {self.received} bytes: "
                f"{exc or type(exc).__name__}"
            ) from None
        self.received += n
        if n == 0 and self.length is not None and self.received != self.length:
            raise TransferInterrupted(
                f"the upload ended after {self.received} of {self.length} bytes"
            )
        return n

    def release(self) -> None:
        """Once the feed is done with the body: the transport goes back to aiohttp, for
        the answer and the close (after the answer, when the body was not all read)."""
        if isinstance(self._reader, TransportBody):
            self._request.content.feed_eof()  # nothing left for aiohttp to read or linger on
            if self._reader.unread:
                linger_after_answer(self._request, self._reader)
            else:
                self._reader.release()


async def close_after_answer(request: web.Request, response: web.StreamResponse) -> None:
    if request.get(_CLOSE_AFTER_ANSWER):
        response.force_close()
        response.headers["Connection"] = "close"  # the headers are made before this hook


async def multipart_file(request: web.Request) -> AsyncIterator[bytes]:
    reader = await request.multipart()
    while True:
        part = await reader.next()
        if part is None:
            raise BadRequest('the multipart form has no part named "file"')
        if isinstance(part, aiohttp.BodyPartReader) and part.name == "file":
            break
        await part.release()
    while chunk := await part.read_chunk(READ_CHUNK):
        yield chunk


def _wrong_range(offset: int) -> ApiError:
    return RangeNotSatisfiable(
        f"the upload continues at byte {offset}: send Content-Range: bytes {offset}-LAST/TOTAL "
        f"(curl -C {offset} -T FILE URL)",
        offset=offset,
    )


def _wrong_tus_offset(offset: int) -> ApiError:
    return Conflict(
        f"the upload continues at byte {offset}, not at the Upload-Offset sent", offset=offset
    )


def _bytes_number(text: str, name: str) -> int:
    digits = text.strip()
    if not _NUMBER.fullmatch(digits) or len(digits.lstrip("0")) > MAX_DIGITS:
        raise BadRequest(f"{name} {quoted(text)} is not a number of bytes")
    return int(digits)


def _header_number(request: web.Request, name: str) -> int | None:
    value = request.headers.get(name)
    return None if value is None else _bytes_number(value, name)


class _PreconditionFailed(ApiError):
    code = 412
    reason = "PreconditionFailed"


def _check_tus_version(request: web.Request) -> None:
    version = request.headers.get("Tus-Resumable")
    if version is not None and version.strip() != TUS_VERSION:
        raise _PreconditionFailed(
            f"this server speaks tus {TUS_VERSION}, not {quoted(version)}",
            headers={"Tus-Version": TUS_VERSION, "Tus-Resumable": TUS_VERSION},
        )


def _length_deferred(request: web.Request) -> bool:
    """`Upload-Defer-Length: 1`: the upload's length comes with a later PATCH."""
    value = request.headers.get("Upload-Defer-Length")
    if value is None:
        return False
    if value.strip() != "1":
        raise BadRequest(f"Upload-Defer-Length {quoted(value)} is not 1, its only value")
    return True


def _part(request: web.Request, body: Reader = EMPTY) -> UploadPart:
    """What a request carries: where its bytes go, and the image's length when it says
    (`Upload-Length`, the `Content-Range` total, or else the `Content-Length` of a whole
    image). Lengths that disagree are refused (400) before a byte is read."""
    upload_length = _header_number(request, "Upload-Length")
    content_range = request.headers.get("Content-Range")
    if request.method == "PATCH" or _is_creation_with_upload(request):
        if request.content_type != "application/offset+octet-stream":
            raise UnsupportedMediaType(
                "a tus PATCH needs Content-Type: application/offset+octet-stream"
            )
        _check_tus_version(request)
        # A creation with its upload carries the upload's first bytes.
        start = 0 if request.method == "POST" else _header_number(request, "Upload-Offset")
        if start is None:
            raise BadRequest("a tus PATCH needs Upload-Offset")
        part = UploadPart(body, start, upload_length, False, _wrong_tus_offset, ends_at_total=True)
        part.deferred = upload_length is None and _length_deferred(request)
    elif content_range is not None:
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        if match is None:
            raise BadRequest(
                f'Content-Range {quoted(content_range)} is not "bytes FIRST-LAST/TOTAL"'
            )
        first, last, total = (_bytes_number(g, "Content-Range") for g in match.groups())
        if first > last or last >= total or request.content_length not in (None, last - first + 1):
            raise BadRequest(f"Content-Range {quoted(content_range)} does not match the body")
        if upload_length not in (None, total):
            raise BadRequest(
                f"Upload-Length says the image is {upload_length} bytes long, Content-Range "
                f"says {total}"
            )
        part = UploadPart(body, first, total, False, _wrong_range)
    else:
        length = request.content_length
        if None not in (upload_length, length) and upload_length != length:
            # Without Content-Range or Upload-Offset the body is the whole image (tus's
            # creation requests are told apart before).
            raise BadRequest(
                f"a request without Content-Range or Upload-Offset carries the whole image: "
                f"its Content-Length ({length}) must be its Upload-Length ({upload_length})"
            )
        declared = upload_length if upload_length is not None else length
        part = UploadPart(body, 0, declared, True, _wrong_range)
    part.length = request.content_length
    part.check_fits(part.total)
    return part


def _request_part(request: web.Request, body: Reader = EMPTY) -> UploadPart:
    if request.content_type != "multipart/form-data":
        return _part(request, body)
    if request.method != "POST":
        raise BadRequest("multipart/form-data uploads use POST")
    return UploadPart(body, 0, None, True, _wrong_range, length=request.content_length)


def _admitted_part(
    request: web.Request, uploads: UploadSessions, body: Reader = EMPTY
) -> tuple[UploadPart, Image]:
    """Everything about a request that can be checked before its body is read, in the
    order of the answers: the token (404, 409, 410), the headers (400, 415), the sizes
    (413), then whether the image takes this part now (409, 416, 411, 400)."""
    token = request.match_info["token"]
    uploads.find(token)
    part = _request_part(request, body)
    return part, uploads.admit(token, part)


def _declares_length(request: web.Request) -> bool:
    return "Upload-Length" in request.headers or "Upload-Defer-Length" in request.headers


def _is_creation(request: web.Request) -> bool:
    """A tus creation request: a POST that declares the upload's length (or defers it)
    and carries no body."""
    if request.method != "POST" or request.content_type == "multipart/form-data":
        return False
    if not _declares_length(request):
        return False
    length = request.content_length
    return length == 0 or (length is None and not request.body_exists)


def _is_creation_with_upload(request: web.Request) -> bool:
    """tus `creation-with-upload`: a creation request whose body is the upload's first
    bytes (`Content-Type: application/offset+octet-stream`)."""
    return (
        request.method == "POST"
        and request.content_type == "application/offset+octet-stream"
        and _declares_length(request)
        and not _is_creation(request)
    )


def _own_url(request: web.Request, image: Image) -> str:
    """The absolute upload URL the request came to: as the image's status gives it when
    the request used that host, else as the request names it."""
    urls = image.status.get("imageUploadURLs", {})
    for url in urls.values() if isinstance(urls, dict) else ():
        parts = urlsplit(str(url))
        if parts.netloc == request.host and parts.path == request.path:
            return str(url)
    return str(request.url.with_query(None))


def _declare(request: web.Request) -> tuple[Image, int]:
    """A creation request's declaration: the upload's length, or that it comes later.
    Returns the image and where its upload continues."""
    _check_tus_version(request)
    length = _header_number(request, "Upload-Length")
    deferred = _length_deferred(request)
    if (length is None) == (not deferred):
        raise BadRequest(
            "a tus creation request sends Upload-Length or Upload-Defer-Length: 1, not both"
        )
    return _uploads(request).create(request.match_info["token"], length)


async def create(request: web.Request) -> web.Response:
    """tus creation: records the upload's length (or that it comes later) and answers
    where to send the bytes, this same URL. Nothing is received: the image stays waiting,
    and an upload that already took bytes keeps them (the answer's Upload-Offset)."""
    image, offset = _declare(request)
    headers = {"Location": _own_url(request, image), **offset_headers(offset)}
    return web.Response(status=201, headers=headers)


async def create_with_upload(request: web.Request) -> web.Response:
    """tus creation-with-upload: the creation, then its body as the upload's first part.
    An upload that already took bytes keeps them and the body is not read: the answer's
    Upload-Offset says where the client goes on, as tus allows."""
    image, offset = _declare(request)
    headers = {"Location": _own_url(request, image)}
    if offset == 0:
        offset, _ = await _receive(request)
    return web.Response(status=201, headers={**headers, **offset_headers(offset)})


async def post(request: web.Request) -> web.StreamResponse:
    """POST: tus creation (with or without the first bytes), or a part of the image like
    PUT (multipart forms)."""
    if _is_creation(request):
        return await create(request)
    if _is_creation_with_upload(request):
        return await create_with_upload(request)
    return await put(request)


async def check_before_body(request: web.Request) -> web.StreamResponse | None:
    """Expect handler: refuse a bad token, a busy image or a wrong offset before the body
    is sent."""
    if _is_creation(request):
        return None  # no body to hold back; the handler answers
    if _is_creation_with_upload(request):
        # The declaration comes first and may change what a part is checked against.
        return continue_unless_refused(request, lambda: _uploads(request).find(_token(request)))
    return continue_unless_refused(request, lambda: _admitted_part(request, _uploads(request)))


def continue_unless_refused(
    request: web.Request, admit: Callable[[], object]
) -> web.Response | None:
    """The answer to a request before its body: the refusal `admit` raises, or else (when
    the client waits for it) `100 Continue`."""
    try:
        admit()
    except ApiError as exc:
        return status_response(exc.code, exc.reason, exc.message, exc.headers)
    except TransferError as exc:
        return status_response(exc.http_status, exc.reason, exc.message)
    if request.version >= aiohttp.HttpVersion11 and (
        request.headers.get("Expect", "").lower() == "100-continue"
    ):
        request.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
    return None


def _token(request: web.Request) -> str:
    return request.match_info["token"]


async def put(request: web.Request) -> web.StreamResponse:
    """PUT, POST and tus PATCH: one request's part of the image."""
    offset, done = await _receive(request)
    if done is None:
        return web.Response(status=204, headers=offset_headers(offset))
    answer = {
        "phase": done.phase,
        "offset": offset,
        "progress": done.status.get("progress"),
        "format": done.status.get("format"),
        "checksum": done.status.get("checksum"),
    }
    return web.Response(
        text=json.dumps(answer) + "\n",
        content_type="application/json",
        headers=offset_headers(offset),
    )


async def _receive(request: web.Request) -> tuple[int, Image | None]:
    """Takes the request's part of the image. Returns where the upload now stands and,
    once the image is complete, the image; a part that did not end well is an error."""
    uploads = _uploads(request)
    multipart = request.content_type == "multipart/form-data"
    body = RequestBody(request, multipart_file(request) if multipart else None)
    part, image = _admitted_part(request, uploads, body)
    try:
        how, done = await uploads.receive(_token(request), part)
    finally:
        body.release()
    offset = uploads.offset(image.key)
    if how is BodyEnd.PARTIAL:
        return offset, None
    if how is BodyEnd.IDLE:
        raise RequestTimeout(
            f"nothing arrived for {uploads.config.upload_idle_timeout:g} s; the upload "
            f"stays resumable at byte {offset}",
            headers={"Connection": "close"},
            offset=offset,
        )
    if how is BodyEnd.TAKEN_OVER:
        raise Conflict("a newer request continues this upload", offset=offset)
    if how is BodyEnd.BROKEN or done is None:
        raise BadRequest(
            f"the upload broke off; it continues at byte {offset}",
            headers={"Connection": "close"},
            offset=offset,
        )
    return uploads.received(done), done


async def head(request: web.Request) -> web.Response:
    uploads = _uploads(request)
    state = uploads.state(uploads.lookup(request.match_info["token"]))
    headers = {
        "Upload-Offset": str(state.offset),
        "Tus-Resumable": TUS_VERSION,
        "Cache-Control": "no-store",
    }
    if state.length is not None:
        headers["Upload-Length"] = str(state.length)
    else:
        headers["Upload-Defer-Length"] = "1"
    return web.Response(status=200, headers=headers)


async def get(request: web.Request) -> web.Response:
    uploads = _uploads(request)
    state = uploads.state(uploads.lookup(request.match_info["token"]))
    return web.Response(text=json.dumps(state.to_json()) + "\n", content_type="application/json")


def _is_upload_url(request: web.Request) -> bool:
    return request.path.startswith("/upload/")


async def options(request: web.Request) -> web.Response:
    """tus's discovery, and a browser's preflight (see cors.py)."""
    return web.Response(
        status=204,
        headers={
            "Tus-Resumable": TUS_VERSION,
            "Tus-Version": TUS_VERSION,
            "Tus-Max-Size": str(_uploads(request).max_image_size),
            "Tus-Extension": "creation,creation-defer-length,creation-with-upload",
            **preflight_headers(request, "PUT, POST, PATCH, HEAD, GET, OPTIONS"),
        },
    )


def add_routes(app: web.Application) -> None:
    app.on_response_prepare.append(close_after_answer)
    app.on_response_prepare.append(allow_any_origin(_is_upload_url))
    path = "/upload/{token}"
    app.router.add_route("PUT", path, put, expect_handler=check_before_body)
    app.router.add_route("POST", path, post, expect_handler=check_before_body)
    app.router.add_route("PATCH", path, put, expect_handler=check_before_body)
    app.router.add_route("HEAD", path, head)
    app.router.add_route("GET", path, get)
    app.router.add_route("OPTIONS", path, options)
