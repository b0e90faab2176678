"""The answer to a body refused halfway, sent before the connection closes.

A body taken over from aiohttp (`TransportBody`) that the upload stops reading early is
still arriving when the answer goes out; closing then would reset the connection and could
destroy the answer (see importer/sources/transportbody.py). The handler leaves such a body
here; this middleware sends the answer, drops what the sender still sends for a few seconds
at most, and only then lets aiohttp close the connection.
"""

from __future__ import annotations

import contextlib

from aiohttp import web

from importer.sources.transportbody import TransportBody
from uploader.errors import Handler

# Enough for the answer to reach a sender on a slow link and for it to stop sending.
LINGER_SECONDS = 5.0
_UNREAD_BODY = "lingering.unread_body"


def linger_after_answer(request: web.Request, body: TransportBody) -> None:
    """`body` (not all read) is released once the answer is out and the rest drained."""
    request[_UNREAD_BODY] = body


@web.middleware
async def lingering_close_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
        body: TransportBody | None = request.get(_UNREAD_BODY)
        if body is not None:
            # A sender that went away has nothing left to read the answer with.
            with contextlib.suppress(ConnectionError):
                await response.prepare(request)
                await response.write_eof()
                await body.discard_rest(LINGER_SECONDS)
        return response
    finally:
        unread = request.pop(_UNREAD_BODY, None)
        if unread is not None:
            unread.release()
