"""The rest of an HTTP body of known length, received straight into the reader's buffers.

aiohttp hands a body on as new `bytes` per piece, after two copies of its own (the event
loop's read buffer, the parser's body slice); at hundreds of MB/s those copies and the
per-piece calls are most of the event loop's CPU. A `TransportBody` takes the connection's
transport over from aiohttp for the rest of the body (`set_protocol` with a
`BufferedProtocol`), so the kernel copies the bytes into the caller's buffer and nothing
else touches them. What aiohttp had already buffered is handed out first.

The connection cannot go back to aiohttp for another message (its parser still counts the
body), so `release()` hands the transport back only for closing: the server closes the
connection after its answer, the client does not put it back in the pool.

A body refused halfway is still arriving when its answer is sent. Closing a socket with
unread bytes makes the kernel reset the connection, and a reset can destroy the answer in
the sender's receive buffer before the sender reads it (curl then says "Connection reset",
not why). So after such an answer, `discard_rest` reads and drops what still comes, until
the sender stops or a few seconds pass, as web servers' lingering close does.
"""

from __future__ import annotations

import asyncio
from typing import cast

import aiohttp

from importer.sources.reader import ChunkReader, Reader

# Bodies from this size up are taken over; smaller ones stay with aiohttp, and their
# connection stays open for the next request (tus clients send many small parts).
TAKEOVER_MIN = 1 << 20
# A read returns what it has once nothing more arrived for this long, so a slow sender's
# bytes are counted as they come, not once a whole block is full.
QUIET = 0.05
_SPILL = 64 << 10
_DISCARD_BUFFER = 1 << 20


class TransportBody(asyncio.BufferedProtocol):
    """`await readinto(view)` until it returns 0; then `release()`. A connection that
    breaks off raises ConnectionResetError (once the bytes before the break are read)."""

    def __init__(self, transport: asyncio.Transport, buffered: bytes, length: int) -> None:
        """`buffered`: the body's first bytes, already received; `length`: the whole
        body's."""
        self._transport = transport
        self._previous = transport.get_protocol()
        self._pending = memoryview(buffered)[:length]
        self._left = length - len(self._pending)  # still to come from the socket
        self.length = length
        self._target: memoryview | None = None
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self._quiet: asyncio.TimerHandle | None = None
        self._spill = memoryview(bytearray(_SPILL))
        self._error: BaseException | None = None
        self._lost = False
        self._lost_with: Exception | None = None
        self._released = False
        if self._left:
            transport.pause_reading()
            transport.set_protocol(self)

    async def readinto(self, view: memoryview) -> int:
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        if self._error is not None:
            raise self._error
        if not self._left or not len(view):
            return 0
        if self._released:
            raise ConnectionResetError("the connection was handed back")
        loop = asyncio.get_running_loop()
        self._target = view[: min(len(view), self._left)]
        self._filled = 0
        self._waiter = loop.create_future()
        self._transport.resume_reading()
        try:
            await self._waiter
        finally:
            n = self._filled
            self._end_read()
        if n == 0 and self._error is not None:
            raise self._error
        return n

    def _end_read(self) -> None:
        self._target = None
        self._waiter = None
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None
        if not self._lost and not self._released:
            self._transport.pause_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the transport's side -------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None and self._filled < len(self._target):
            return self._target[self._filled :]
        # Reading is paused between reads; a piece that comes anyway is kept for the next.
        return self._spill[: min(_SPILL, self._left)] if self._left else self._spill[:1]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is None or self._filled >= len(self._target):
            kept = bytes(self._spill[: min(nbytes, self._left)])
            self._pending = memoryview(bytes(self._pending) + kept)
            self._left -= len(kept)
            if self._left == 0 or len(self._pending) >= _SPILL:
                self._transport.pause_reading()
            return
        self._filled += nbytes
        self._left -= nbytes
        if self._filled == len(self._target) or self._left == 0:
            self._wake()
        elif self._quiet is None:
            self._quiet = asyncio.get_running_loop().call_later(QUIET, self._wake)

    def eof_received(self) -> bool | None:
        if self._left:
            self._fail(None)
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._lost_with = exc
        if self._left:
            self._fail(exc)

    def _fail(self, exc: BaseException | None) -> None:
        if self._error is None:
            received = self.length - self._left
            cause = f": {exc}" if exc else ""
            self._error = ConnectionResetError(
                f"the connection broke off after {received} of {self.length} bytes{cause}"
            )
        self._wake()

    @property
    def unread(self) -> int:
        """Bytes of the body not handed out yet (buffered or still to come)."""
        return self._left + len(self._pending)

    async def discard_rest(self, seconds: float) -> None:
        """Drops the rest of the body as it arrives, until it is all in, the sender closes,
        or `seconds` pass (see the module's docstring for why)."""
        self._pending = memoryview(b"")
        scratch = memoryview(bytearray(_DISCARD_BUFFER))
        try:
            async with asyncio.timeout(seconds):
                while await self.readinto(scratch):
                    pass
        except (TimeoutError, ConnectionError):
            pass

    def release(self) -> None:
        """Gives the transport back to the protocol it was taken from; a read still
        waiting ends with ConnectionResetError."""
        if self._released:
            return
        self._released = True
        if self._waiter is not None:
            self._fail(None)
        if self._lost:  # the transport told us instead of the protocol it was taken from
            self._previous.connection_lost(self._lost_with)
        elif self._transport.get_protocol() is self:
            self._transport.set_protocol(self._previous)


def body_reader(
    content: aiohttp.StreamReader, transport: asyncio.BaseTransport | None, length: int | None
) -> Reader:
    """The rest of the body that aiohttp receives into `content`: taken over when its
    `length` is known, from TAKEOVER_MIN up and not all in yet (the caller must then close
    the connection after it, see the module's docstring); else read through aiohttp."""
    if (
        length is not None
        and length >= TAKEOVER_MIN
        and transport is not None
        and not content.is_eof()
    ):
        return TransportBody(cast(asyncio.Transport, transport), content.read_nowait(-1), length)
    return ChunkReader(content.iter_any())
