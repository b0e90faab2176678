"""The upload URLs: `/upload/{token}` (CONTRACT section 3).

The token is checked when the request starts, before `100 Continue` is sent, so a
mistyped URL is refused before a single byte of a big body moves.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from importer.errors import ImageTooLarge, TransferError, TransferInterrupted
from uploader.api import CONTROLLER
from uploader.errors import (
    ApiError,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    RangeNotSatisfiable,
    status_response,
)
from uploader.images import READY, ImageController
from uploader.store import Object, key_of

TUS_VERSION = "1.0.0"
READ_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_PAYLOAD_ERRORS = (
    ConnectionError,
    asyncio.IncompleteReadError,
    aiohttp.ClientPayloadError,
    HttpProcessingError,
)


def _controller(request: web.Request) -> ImageController:
    return request.app[CONTROLLER]


async def _chunks(
    stream: AsyncIterator[bytes], expected_length: int | None
) -> AsyncIterator[bytes]:
    """The body as it arrives; a sender that goes away early is a TransferInterrupted."""
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            yield chunk
    except _PAYLOAD_ERRORS as exc:
        raise TransferInterrupted(
            f"the upload was interrupted after {received} bytes: {exc or type(exc).__name__}"
        ) from None
    if expected_length is not None and received != expected_length:
        raise TransferInterrupted(f"the upload ended after {received} of {expected_length} bytes")


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


def _expected_length(request: web.Request) -> int | None:
    """The image's total length, from Content-Range or Content-Length, when known."""
    content_range = request.headers.get("Content-Range")
    if content_range is None:
        return request.content_length
    match = _CONTENT_RANGE.match(content_range.strip())
    if match is None:
        raise BadRequest(f'Content-Range "{content_range}" is not "bytes FIRST-LAST/TOTAL"')
    first, last, total = (int(g) for g in match.groups())
    if first != 0:
        # Nothing of an earlier attempt is kept, so the only offset to continue at is 0.
        raise _wrong_offset(first)
    if last >= total or (request.content_length not in (None, last + 1)):
        raise BadRequest(f'Content-Range "{content_range}" does not match the body')
    return total


def _wrong_offset(offset: int) -> ApiError:
    return RangeNotSatisfiable(
        f"the upload cannot continue at byte {offset}: this server has taken 0 bytes of "
        "this image; upload it whole from byte 0",
        headers={"Upload-Offset": "0", "Tus-Resumable": TUS_VERSION},
    )


def _check_size(request: web.Request, controller: ImageController) -> None:
    length = request.content_length
    limit = controller.config.max_image_size
    if length is not None and length > limit:
        raise ImageTooLarge(f"the upload of {length} bytes exceeds the limit of {limit} bytes")


async def check_before_body(request: web.Request) -> web.StreamResponse | None:
    """Expect handler: refuse a bad token or a busy image before the body is sent."""
    controller = _controller(request)
    try:
        obj = controller.find_upload(request.match_info["token"])
        _check_size(request, controller)
        if request.content_type != "multipart/form-data":
            controller.storage.check_length(obj, _expected_length(request))
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
    transfer = controller.transfer_of(key_of(obj))
    offset, length = 0, None
    if transfer is not None:
        offset, length = transfer.progress.done, transfer.progress.total
    if status.get("phase") == READY:
        offset = length = controller.store.received(key_of(obj))
    state = {"phase": status.get("phase"), "offset": offset, "progress": status.get("progress", "")}
    return state, length


async def put(request: web.Request) -> web.Response:
    controller = _controller(request)
    token = request.match_info["token"]
    obj = controller.find_upload(token)
    _check_size(request, controller)
    if request.content_type == "multipart/form-data":
        if request.method != "POST":
            raise BadRequest("multipart/form-data uploads use POST")
        length = None
        source = _chunks(_multipart_file(request), None)
    else:
        length = _expected_length(request)
        # Pieces as they arrived: no joining into new buffers, the pipeline copies once.
        source = _chunks(request.content.iter_any(), length)
    controller.storage.check_length(obj, length)
    obj = await controller.run_upload(token, source, length)
    status = obj["status"]
    body = {
        "phase": status["phase"],
        "offset": controller.store.received(key_of(obj)),
        "progress": status.get("progress"),
        "format": status.get("format"),
        "checksum": status.get("checksum"),
    }
    return web.Response(text=json.dumps(body) + "\n", content_type="application/json")


def _image_for(request: web.Request) -> Object:
    """For requests that only look: a Ready image's token still answers."""
    controller = _controller(request)
    token = request.match_info["token"]
    key = controller.tokens.find(token) or controller.ready_tokens.find(token)
    obj = controller.store.get(key) if key else None
    if obj is None:
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
            "Allow": "PUT, POST, HEAD, GET, OPTIONS",
        },
    )


async def patch(request: web.Request) -> web.Response:
    _controller(request).find_upload(request.match_info["token"])
    raise MethodNotAllowed(
        "tus PATCH uploads are not supported by this server version; "
        "upload the whole image with PUT (curl -T FILE URL)",
        headers={"Allow": "PUT, POST, HEAD, GET, OPTIONS"},
    )


def add_routes(app: web.Application) -> None:
    path = "/upload/{token}"
    app.router.add_route("PUT", path, put, expect_handler=check_before_body)
    app.router.add_route("POST", path, put, expect_handler=check_before_body)
    app.router.add_route("PATCH", path, patch, expect_handler=check_before_body)
    app.router.add_route("HEAD", path, head)
    app.router.add_route("GET", path, get)
    app.router.add_route("OPTIONS", path, options)
