"""The upload URLs: `/upload/{token}` (README: "API").

The token is checked when the request starts, before `100 Continue` is sent, so a
mistyped URL is refused before a single byte of a big body moves.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterable, AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from importer.errors import ImageTooLarge, TransferError, TransferInterrupted
from importer.sources.reader import EMPTY, ChunkReader, Reader
from importer.sources.transportbody import TransportBody, body_reader
from uploader.errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    RangeNotSatisfiable,
    RequestTimeout,
    UnsupportedMediaType,
    status_response,
)
from uploader.quoting import quoted
from uploader.server.control_api import CONTROLLER
from uploader.server.image_db import Object, key_of
from uploader.server.images import READY, ImageController, UploadPart, offset_headers
from uploader.server.upload_feed import BodyEnd

TUS_VERSION = "1.0.0"
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


def _controller(request: web.Request) -> ImageController:
    return request.app[CONTROLLER]


class _RequestBody:
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
        the answer and the close."""
        if isinstance(self._reader, TransportBody):
            self._reader.release()
            self._request.content.feed_eof()  # nothing left for aiohttp to read or linger on


async def _close_after_answer(request: web.Request, response: web.StreamResponse) -> None:
    if request.get(_CLOSE_AFTER_ANSWER):
        response.force_close()
        response.headers["Connection"] = "close"  # the headers are made before this hook


async def _multipart_file(request: web.Request) -> AsyncIterator[bytes]:
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
        headers=offset_headers(offset),
    )


def _wrong_tus_offset(offset: int) -> ApiError:
    return Conflict(
        f"the upload continues at byte {offset}, not at the Upload-Offset sent",
        headers=offset_headers(offset),
    )


def _bytes_number(text: str, name: str) -> int:
    digits = text.strip()
    if not _NUMBER.fullmatch(digits) or len(digits.lstrip("0")) > MAX_DIGITS:
        raise BadRequest(f"{name} {quoted(text)} is not a number of bytes")
    return int(digits)


def _header_number(request: web.Request, name: str) -> int | None:
    value = request.headers.get(name)
    return None if value is None else _bytes_number(value, name)


def _part(request: web.Request, body: Reader = EMPTY) -> UploadPart:
    """What a request carries: where its bytes go, and the image's length when it says
    (`Upload-Length`, the `Content-Range` total, or else the `Content-Length` of a whole
    image). Lengths that disagree are refused (400) before a byte is read."""
    upload_length = _header_number(request, "Upload-Length")
    content_range = request.headers.get("Content-Range")
    if request.method == "PATCH":
        if request.content_type != "application/offset+octet-stream":
            raise UnsupportedMediaType(
                "a tus PATCH needs Content-Type: application/offset+octet-stream"
            )
        start = _header_number(request, "Upload-Offset")
        if start is None:
            raise BadRequest("a tus PATCH needs Upload-Offset")
        part = UploadPart(body, start, upload_length, False, _wrong_tus_offset)
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
            # creation request, which carries none of it, is not supported).
            raise BadRequest(
                f"a request without Content-Range or Upload-Offset carries the whole image: "
                f"its Content-Length ({length}) must be its Upload-Length ({upload_length})"
            )
        total = upload_length if upload_length is not None else length
        part = UploadPart(body, 0, total, True, _wrong_range)
    _check_body_fits(request, part.start, part.total)
    return part


def _check_body_fits(request: web.Request, start: int, total: int | None) -> None:
    length = request.content_length
    if total is None:
        return
    if start > total:
        raise BadRequest(f"the upload continues at byte {start}, past the end of the image")
    if length is not None and length > total - start:
        raise BadRequest(
            f"the body of {length} bytes from byte {start} goes past the end of the image, "
            f"which is {total} bytes long"
        )


def _request_part(request: web.Request, body: Reader = EMPTY) -> UploadPart:
    if request.content_type != "multipart/form-data":
        return _part(request, body)
    if request.method != "POST":
        raise BadRequest("multipart/form-data uploads use POST")
    return UploadPart(body, 0, None, True, _wrong_range)


def _check_size(request: web.Request, controller: ImageController, part: UploadPart) -> None:
    """413 for a body or an image (as the request declares it) larger than the server
    takes, before a byte is read."""
    limit = controller.config.max_image_size
    length = request.content_length
    if length is not None and length > limit:
        raise ImageTooLarge(f"the upload of {length} bytes exceeds the limit of {limit} bytes")
    if part.total is not None and part.total > limit:
        raise ImageTooLarge(
            f"the image of {part.total} bytes (Upload-Length or the Content-Range total) "
            f"exceeds the limit of {limit} bytes"
        )


def _checked_part(
    request: web.Request, controller: ImageController, body: Reader = EMPTY
) -> tuple[UploadPart, Object]:
    """Everything about a request that can be checked before its body is read, in the
    order of the answers: the token (404, 409, 410), the headers (400, 415), the sizes
    (413), then whether the image takes this part now."""
    controller.find_upload(request.match_info["token"])
    part = _request_part(request, body)
    _check_size(request, controller, part)
    return part, _admit(request, controller, part)


def _admit(request: web.Request, controller: ImageController, part: UploadPart) -> Object:
    """Checks a part before its body is read: its offset first (the answer says where to
    continue), that its lengths agree with the upload's, then that the image's length is
    known where it must be: ContainerRegistry storage writes it before the first byte
    (411), and a tus upload ends when it is reached (400)."""
    obj = controller.check_part(request.match_info["token"], part)
    known = part.total
    if known is None and not part.whole:
        transfer = controller.transfer_of(key_of(obj))
        known = transfer.feed.total if transfer and transfer.feed else None
        _check_body_fits(request, part.start, known)
    controller.storage.check_length(obj, known)
    if request.method == "PATCH" and known is None:
        raise BadRequest(
            "a tus PATCH needs the upload's length: send Upload-Length with the first PATCH "
            "(tuspy: TusClient(url, headers={'Upload-Length': str(size)}))"
        )
    return obj


async def check_before_body(request: web.Request) -> web.StreamResponse | None:
    """Expect handler: refuse a bad token, a busy image or a wrong offset before the body
    is sent."""
    controller = _controller(request)
    try:
        _checked_part(request, controller)
    except ApiError as exc:
        return status_response(exc.code, exc.reason, exc.message, exc.headers)
    except TransferError as exc:
        return status_response(exc.http_status, exc.reason, exc.message)
    if request.version >= aiohttp.HttpVersion11 and (
        request.headers.get("Expect", "").lower() == "100-continue"
    ):
        request.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
    return None


def _upload_state(controller: ImageController, obj: Object) -> tuple[dict[str, object], int | None]:
    """What GET answers, and the image's total length when known."""
    status = obj.get("status", {})
    key = key_of(obj)
    transfer = controller.transfer_of(key)
    offset, length = controller.upload_offset(key), None
    if transfer is not None and transfer.feed is not None:
        length = transfer.feed.total
    state = {"phase": status.get("phase"), "offset": offset, "progress": status.get("progress", "")}
    if status.get("phase") == READY:
        # A client that finds the image Ready compares its file with what is stored.
        state["offset"] = length = controller.store.received(key)
        state["format"] = status.get("format")
        state["checksum"] = status.get("checksum")
    return state, length


async def put(request: web.Request) -> web.StreamResponse:
    """PUT, POST and tus PATCH: one request's part of the image."""
    controller = _controller(request)
    token = request.match_info["token"]
    multipart = request.content_type == "multipart/form-data"
    body = _RequestBody(request, _multipart_file(request) if multipart else None)
    part, obj = _checked_part(request, controller, body)
    try:
        how, obj_after = await controller.receive(token, part)
    finally:
        body.release()
    offset = controller.upload_offset(key_of(obj))
    if how is BodyEnd.PARTIAL:
        return web.Response(status=204, headers=offset_headers(offset))
    if how is BodyEnd.IDLE:
        raise RequestTimeout(
            f"nothing arrived for {controller.config.upload_idle_timeout:g} s; the upload "
            f"stays resumable at byte {offset}",
            headers={**offset_headers(offset), "Connection": "close"},
        )
    if how is BodyEnd.TAKEN_OVER:
        raise Conflict("a newer request continues this upload", headers=offset_headers(offset))
    if how is BodyEnd.BROKEN or obj_after is None:
        raise BadRequest(
            f"the upload broke off; it continues at byte {offset}",
            headers={**offset_headers(offset), "Connection": "close"},
        )
    status = obj_after["status"]
    received = controller.store.received(key_of(obj_after))
    body = {
        "phase": status["phase"],
        "offset": received,
        "progress": status.get("progress"),
        "format": status.get("format"),
        "checksum": status.get("checksum"),
    }
    return web.Response(
        text=json.dumps(body) + "\n",
        content_type="application/json",
        headers=offset_headers(received),
    )


def _image_for(request: web.Request) -> Object:
    """For requests that only look: a Ready image's token still answers."""
    controller = _controller(request)
    token = request.match_info["token"]
    key = controller.tokens.find(token) or controller.ready_tokens.find(token)
    obj = controller.store.get(key) if key else None
    if obj is None:
        controller.find_upload(token)  # 410 for the token of a failed image
        raise NotFound("no image waits for an upload at this URL (wrong or expired token)")
    return obj


async def head(request: web.Request) -> web.Response:
    controller = _controller(request)
    state, length = _upload_state(controller, _image_for(request))
    headers = {
        "Upload-Offset": str(state["offset"]),
        "Tus-Resumable": TUS_VERSION,
        "Cache-Control": "no-store",
    }
    if length is not None:
        headers["Upload-Length"] = str(length)
    return web.Response(status=200, headers=headers)


async def get(request: web.Request) -> web.Response:
    state, _ = _upload_state(_controller(request), _image_for(request))
    return web.Response(text=json.dumps(state) + "\n", content_type="application/json")


async def options(request: web.Request) -> web.Response:
    controller = _controller(request)
    return web.Response(
        status=204,
        headers={
            "Tus-Resumable": TUS_VERSION,
            "Tus-Version": TUS_VERSION,
            "Tus-Max-Size": str(controller.config.max_image_size),
            "Tus-Extension": "",
            "Allow": "PUT, POST, PATCH, HEAD, GET, OPTIONS",
        },
    )


def add_routes(app: web.Application) -> None:
    app.on_response_prepare.append(_close_after_answer)
    path = "/upload/{token}"
    app.router.add_route("PUT", path, put, expect_handler=check_before_body)
    app.router.add_route("POST", path, put, expect_handler=check_before_body)
    app.router.add_route("PATCH", path, put, expect_handler=check_before_body)
    app.router.add_route("HEAD", path, head)
    app.router.add_route("GET", path, get)
    app.router.add_route("OPTIONS", path, options)
