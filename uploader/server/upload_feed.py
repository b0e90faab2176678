"""The bytes of one upload, carried by one request after another.

An upload's transfer (its pipeline: hashes, decoder, sink) runs in a task of its own and
reads the image from a feed. Each request that carries part of the image attaches its body
at the feed's current offset; when that body breaks off (a dropped connection, a client
that stopped sending), the transfer does not fail: it waits, with everything it has taken
so far, for the next request to continue at exactly that offset. So a resumed upload ends
with the same checksums and the same image as an uninterrupted one.

A body that stalls can be taken over: a new request at the current offset cuts it, because
a client that reconnects is usually faster than the server at noticing that the old
connection is dead. A body that is still delivering keeps its place (the newcomer gets 409).
Nobody continuing within the grace time ends the transfer (TransferInterrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from importer.errors import ImageTooLarge, Suspended, TransferInterrupted
from importer.sources.reader import Reader
from uploader.errors import BadRequest

# A body that has delivered nothing for this long may be cut by a request that continues.
TAKEOVER_AFTER = 2.0


class BodyEnd(enum.Enum):
    PARTIAL = "partial"  # all of the request's bytes were taken; the image is not complete
    COMPLETE = "complete"  # the image's last byte was taken
    BROKEN = "broken"  # the connection broke off
    IDLE = "idle"  # nothing arrived for the idle timeout; the request is cut
    TAKEN_OVER = "taken over"  # a newer request continues the upload
    STOPPED = "stopped"  # the transfer ended (refused, failed or cancelled) meanwhile


@dataclass(eq=False)
class Body:
    """One request's part of the upload."""

    reader: Reader
    start: int
    open_ended: bool  # when the image's length is unknown, this body's end is the image's
    end: asyncio.Future[BodyEnd] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    waiting_since: float | None = None  # when the transfer began waiting for its next piece
    cut_off: bool = False  # a newer request continues the upload, or the server stops
    _read: asyncio.Future[int] | None = None

    def cut(self) -> None:
        self.cut_off = True
        if self._read is not None:
            self._read.cancel()

    def finish(self, how: BodyEnd) -> None:
        if not self.end.done():
            self.end.set_result(how)

    @property
    def stalled(self) -> bool:
        since = self.waiting_since
        return since is not None and time.monotonic() - since > TAKEOVER_AFTER


class OffsetMismatch(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class Busy(Exception):
    """Another request is delivering this upload right now."""


class _Cut(Exception):
    pass


class UploadFeed:
    """`readinto()` for the transfer (and `close()` after it); `attach()` for each
    request."""

    def __init__(
        self,
        total: int | None,
        grace: float,
        idle_timeout: float,
        on_park: Callable[[BodyEnd | None], None] = lambda how: None,
        offset: int = 0,
    ) -> None:
        """`on_park(how)` hears of each body that ended short of the image (`how`) and of
        each body that continues it (None). `offset`: where a resumed upload stands."""
        self.offset = offset
        self.total = total
        self.grace = grace
        self.idle_timeout = idle_timeout
        self.on_park = on_park
        self._parked = False
        self._suspended = False
        self._body: Body | None = None
        self._changed = asyncio.Event()
        self._closed = False

    def suspend(self) -> None:
        """Ends the stream for now (the server stops): the request streaming, if any, is
        cut, and the transfer hears `Suspended` (it then saves a checkpoint)."""
        self._suspended = True
        if self._body is not None:
            self._body.cut()
        self._changed.set()

    @property
    def complete(self) -> bool:
        return self.total is not None and self.offset >= self.total

    @property
    def attached(self) -> Body | None:
        return self._body

    async def attach(
        self,
        reader: Reader,
        start: int,
        total: int | None,
        open_ended: bool = False,
    ) -> Body:
        """Hands a request's body to the transfer; it must start at the current offset."""
        current = self._body
        if current is not None:
            if not current.stalled:
                raise Busy()
            current.cut()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(current.end), TAKEOVER_AFTER)
            if self._body is not None:
                raise Busy()
        if start != self.offset or self._closed:
            raise OffsetMismatch(self.offset)
        if total is not None:
            if self.total is not None and total != self.total:
                raise BadRequest(f"this upload is {self.total} bytes long; a request says {total}")
            self.total = total
        body = Body(reader, start, open_ended)
        self._body = body
        self._changed.set()
        if self._parked:
            self._parked = False
            self.on_park(None)
        return body

    async def readinto(self, view: memoryview) -> int:
        """Puts the image's next bytes at the front of `view`, from whichever request
        carries them; 0 once the image is complete (a Reader for the transfer)."""
        while not self.complete:
            body = await self._next_body()  # the attached one, while it lasts
            n = await self._take(body, view)
            if n:
                return n
            if body.end.result() is BodyEnd.COMPLETE:
                break
        await self._confirm_end(view)
        return 0

    async def _confirm_end(self, view: memoryview) -> None:
        """A body still attached at the image's last byte must end there: one more read
        finds its end at once when the request said its length, and for a chunked body,
        either its end or bytes past the image's length (ImageTooLarge)."""
        body = self._body
        if body is not None and not body.end.done():
            await self._take(body, view)

    def close(self) -> None:
        """The transfer is over: the request still attached, if any, is let go."""
        self._closed = True
        if self._body is not None:
            self._body.finish(BodyEnd.STOPPED)
            self._body = None

    async def _take(self, body: Body, view: memoryview) -> int:
        """The body's next bytes; 0 once the body ended (how is recorded)."""
        try:
            n = await self._read(body, view)
            if n:
                if self.total is not None and self.offset + n > self.total:
                    raise ImageTooLarge(
                        f"the upload sends more than the {self.total} bytes it announced"
                    )
                self.offset += n
                return n
            if self.total is None and body.open_ended:
                self.total = self.offset
            how = BodyEnd.COMPLETE if self.complete else BodyEnd.PARTIAL
        except TransferInterrupted:
            how = BodyEnd.BROKEN
        except _Cut:
            how = BodyEnd.STOPPED if self._suspended else BodyEnd.TAKEN_OVER
        except TimeoutError:
            how = BodyEnd.IDLE
        except BaseException:
            self._end(body, BodyEnd.STOPPED)
            raise
        self._end(body, how)
        return 0

    def _end(self, body: Body, how: BodyEnd) -> None:
        self._body = None
        body.finish(how)
        # A part that simply ended (tus sends the image in parts) is no interruption.
        if how in (BodyEnd.BROKEN, BodyEnd.IDLE, BodyEnd.TAKEN_OVER):
            self._parked = True
            self.on_park(how)

    async def _read(self, body: Body, view: memoryview) -> int:
        """The body's next bytes, unless it stays idle or a newer request cuts it."""
        if body.cut_off:
            raise _Cut()
        body.waiting_since = time.monotonic()
        read = body._read = asyncio.ensure_future(body.reader.readinto(view))
        try:
            await asyncio.wait({read}, timeout=self.idle_timeout)
        finally:
            body.waiting_since = None
            body._read = None
            if not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read
        if not read.cancelled():
            return read.result()
        if body.cut_off:
            raise _Cut()
        raise TimeoutError()

    async def _next_body(self) -> Body:
        deadline = time.monotonic() + self.grace
        while self._body is None:
            if self._suspended:
                raise Suspended(
                    f"the server is stopping; the upload continues at byte {self.offset} "
                    "once it is back"
                )
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferInterrupted(
                    f"the upload stopped at byte {self.offset} and nobody continued it "
                    f"within {self.grace:g} s; upload it again"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self._body
