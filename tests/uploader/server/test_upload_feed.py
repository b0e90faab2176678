"""The upload feed on its own: request bodies as in-memory readers the test feeds, the
transfer as a task that reads the feed to its end. No sockets, no server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from waiting import wait_until_async

from importer.errors import ImageTooLarge, Suspended, TransferInterrupted
from uploader.errors import BadRequest
from uploader.server import upload_feed
from uploader.server.upload_feed import Body, BodyEnd, Busy, OffsetMismatch, UploadFeed

IMAGE = bytes(range(256)) * 4  # 1 KiB, every offset tells which byte it is
SOON = 5.0  # seconds within which what a test waits for is there


class MemoryBody:
    """A request's body the test writes into: `send` bytes, then `end` it as a request
    ends, or `break_off` as a dropped connection (the reader raises TransferInterrupted).
    Until then a read waits, as on a client that sends nothing."""

    def __init__(self, *pieces: bytes) -> None:
        self._pieces: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self._rest = b""
        for piece in pieces:
            self.send(piece)

    def send(self, data: bytes) -> None:
        self._pieces.put_nowait(data)

    def end(self) -> None:
        self._pieces.put_nowait(b"")

    def break_off(self) -> None:
        self._pieces.put_nowait(TransferInterrupted("the connection broke off"))

    async def readinto(self, view: memoryview) -> int:
        if not self._rest:
            piece = await self._pieces.get()
            if isinstance(piece, BaseException):
                raise piece
            if not piece:
                return 0
            self._rest = piece
        n = min(len(view), len(self._rest))
        view[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


class Transfer:
    """Reads a feed to its end in a task of its own, a few bytes at a time, as the
    pipeline does with its blocks."""

    def __init__(self, feed: UploadFeed, read_size: int = 100) -> None:
        self.feed = feed
        self.received = bytearray()
        self.task = asyncio.create_task(self._run(read_size))

    async def _run(self, read_size: int) -> bytes:
        block = bytearray(read_size)
        view = memoryview(block)
        while n := await self.feed.readinto(view):
            self.received += block[:n]
        return bytes(self.received)

    async def has(self, count: int) -> None:
        await wait_until_async(
            lambda: len(self.received) >= count, SOON, what=f"{count} bytes read"
        )

    async def result(self) -> bytes:
        return await asyncio.wait_for(self.task, SOON)


class Parks:
    """What `on_park` heard, in order."""

    def __init__(self) -> None:
        self.heard: list[BodyEnd | None] = []

    def __call__(self, how: BodyEnd | None) -> None:
        self.heard.append(how)


def feed_of(
    total: int | None = len(IMAGE),
    grace: float = SOON,
    idle_timeout: float = SOON,
    offset: int = 0,
    parks: Parks | None = None,
) -> UploadFeed:
    return UploadFeed(total, grace, idle_timeout, parks or Parks(), offset)


async def ended(body: Body) -> BodyEnd:
    return await asyncio.wait_for(asyncio.shield(body.end), SOON)


def ended_with_the_image(feed: UploadFeed, body: Body) -> None:
    """The body that carried the image's last byte was read to its end, which came there."""
    assert body.end.result() is BodyEnd.COMPLETE
    assert feed.attached is None


@pytest.fixture
def quick_takeover(monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    """A body that waits this long counts as stalled (the real 2 s would slow the tests)."""
    monkeypatch.setattr(upload_feed, "TAKEOVER_AFTER", 0.05)
    yield 0.05


# -- one body -----------------------------------------------------------------------------


async def test_one_body_of_the_whole_image_ends_the_transfer() -> None:
    parks = Parks()
    feed = feed_of(parks=parks)
    transfer = Transfer(feed)
    body = await feed.attach(MemoryBody(IMAGE[:300], IMAGE[300:], b""), 0, len(IMAGE))
    assert await transfer.result() == IMAGE
    assert feed.complete and feed.offset == len(IMAGE)
    ended_with_the_image(feed, body)
    assert parks.heard == []


async def test_a_body_of_unknown_length_that_ends_sets_the_image_length() -> None:
    feed = feed_of(total=None)
    transfer = Transfer(feed)
    reader = MemoryBody(IMAGE[:700])
    body = await feed.attach(reader, 0, None, open_ended=True)
    await transfer.has(700)
    assert feed.total is None and not feed.complete
    reader.end()
    assert await transfer.result() == IMAGE[:700]
    assert await ended(body) is BodyEnd.COMPLETE
    assert (feed.total, feed.offset) == (700, 700)


async def test_a_body_that_says_the_length_gives_it_to_a_feed_that_did_not_know_it() -> None:
    feed = feed_of(total=None)
    transfer = Transfer(feed)
    body = await feed.attach(MemoryBody(IMAGE, b""), 0, len(IMAGE))
    assert feed.total == len(IMAGE)
    assert await transfer.result() == IMAGE
    ended_with_the_image(feed, body)


async def test_a_body_must_start_at_the_offset_the_feed_stands_at() -> None:
    feed = feed_of(offset=512)
    for start in (0, 511, 513):
        with pytest.raises(OffsetMismatch) as refused:
            await feed.attach(MemoryBody(IMAGE[start:]), start, len(IMAGE))
        assert refused.value.offset == 512
    assert feed.attached is None
    # A resumed upload goes on from where it stood, to the same end.
    transfer = Transfer(feed)
    body = await feed.attach(MemoryBody(IMAGE[512:], b""), 512, len(IMAGE))
    assert await transfer.result() == IMAGE[512:]
    ended_with_the_image(feed, body)


async def test_a_body_that_says_another_length_is_a_bad_request() -> None:
    feed = feed_of()
    with pytest.raises(BadRequest, match=f"this upload is {len(IMAGE)} bytes long"):
        await feed.attach(MemoryBody(IMAGE), 0, len(IMAGE) + 1)
    assert feed.attached is None and feed.total == len(IMAGE)


async def test_more_bytes_than_the_length_fail_the_transfer_and_are_not_counted() -> None:
    feed = feed_of()
    transfer = Transfer(feed, read_size=len(IMAGE) + 10)
    body = await feed.attach(MemoryBody(IMAGE[:1000], IMAGE[1000:] + b"0123456789"), 0, None)
    with pytest.raises(ImageTooLarge, match=f"more than the {len(IMAGE)} bytes"):
        await transfer.result()
    assert feed.offset == 1000  # the bytes that went past the end were refused, not counted
    assert await ended(body) is BodyEnd.STOPPED
    assert feed.attached is None


async def test_a_chunked_body_that_goes_on_past_the_length_is_refused() -> None:
    # The image's length came first (Upload-Length, a creation request); the body says
    # none, and its extra bytes come in a later piece than its last good one.
    feed = feed_of()
    transfer = Transfer(feed)
    body = await feed.attach(MemoryBody(IMAGE, b"extra", b""), 0, None)
    with pytest.raises(ImageTooLarge, match=f"more than the {len(IMAGE)} bytes"):
        await transfer.result()
    assert feed.offset == len(IMAGE)
    assert await ended(body) is BodyEnd.STOPPED


async def test_a_chunked_body_is_read_to_its_end_at_the_image_s_last_byte() -> None:
    feed = feed_of()
    transfer = Transfer(feed)
    reader = MemoryBody(IMAGE)
    body = await feed.attach(reader, 0, None)
    await transfer.has(len(IMAGE))
    assert not transfer.task.done()  # its end, or more bytes, must come first
    reader.end()
    assert await transfer.result() == IMAGE
    ended_with_the_image(feed, body)


# -- a body that breaks off, and the one that continues it --------------------------------


async def test_a_body_that_breaks_off_leaves_the_transfer_waiting_for_the_rest() -> None:
    parks = Parks()
    feed = feed_of(parks=parks)
    transfer = Transfer(feed)
    first = MemoryBody(IMAGE[:400])
    body = await feed.attach(first, 0, len(IMAGE))
    await transfer.has(400)
    first.break_off()
    assert await ended(body) is BodyEnd.BROKEN
    assert parks.heard == [BodyEnd.BROKEN]
    assert feed.offset == 400 and feed.attached is None
    assert not transfer.task.done()  # waiting, with what it has
    # Anywhere but the offset is refused; at the offset the transfer goes on.
    with pytest.raises(OffsetMismatch) as refused:
        await feed.attach(MemoryBody(IMAGE), 0, len(IMAGE))
    assert refused.value.offset == 400
    second = await feed.attach(MemoryBody(IMAGE[400:], b""), 400, len(IMAGE))
    assert parks.heard == [BodyEnd.BROKEN, None]
    assert await transfer.result() == IMAGE
    ended_with_the_image(feed, second)


async def test_a_body_that_sends_nothing_for_the_idle_timeout_is_cut() -> None:
    parks = Parks()
    feed = feed_of(idle_timeout=0.05, parks=parks)
    transfer = Transfer(feed)
    body = await feed.attach(MemoryBody(IMAGE[:100]), 0, len(IMAGE))
    assert await ended(body) is BodyEnd.IDLE  # the idle timeout is the point here
    assert parks.heard == [BodyEnd.IDLE]
    assert feed.offset == 100 and not transfer.task.done()
    await feed.attach(MemoryBody(IMAGE[100:]), 100, len(IMAGE))
    assert await transfer.result() == IMAGE


async def test_nobody_continuing_within_the_grace_time_ends_the_transfer() -> None:
    feed = feed_of(grace=0.1)
    transfer = Transfer(feed)
    first = MemoryBody(IMAGE[:300])
    await feed.attach(first, 0, len(IMAGE))
    await transfer.has(300)
    first.break_off()
    with pytest.raises(TransferInterrupted, match="stopped at byte 300 and nobody continued"):
        await transfer.result()


async def test_a_part_that_ends_short_of_the_image_is_no_interruption() -> None:
    parks = Parks()
    feed = feed_of(parks=parks)
    transfer = Transfer(feed)
    part = await feed.attach(MemoryBody(IMAGE[:600], b""), 0, len(IMAGE))
    assert await ended(part) is BodyEnd.PARTIAL
    assert parks.heard == []  # tus sends the image in parts: nothing was interrupted
    assert feed.offset == 600 and not transfer.task.done()
    rest = await feed.attach(MemoryBody(IMAGE[600:], b""), 600, None)
    assert await transfer.result() == IMAGE
    ended_with_the_image(feed, rest)
    assert parks.heard == []


# -- a second body at the same time -------------------------------------------------------


async def test_a_second_body_while_the_first_delivers_is_refused() -> None:
    feed = feed_of()
    transfer = Transfer(feed)
    reader = MemoryBody(IMAGE[:200])
    first = await feed.attach(reader, 0, len(IMAGE))
    await transfer.has(200)
    with pytest.raises(Busy):
        await feed.attach(MemoryBody(IMAGE[200:]), 200, len(IMAGE))
    assert feed.attached is first and not first.end.done()
    reader.send(IMAGE[200:])
    reader.end()
    assert await transfer.result() == IMAGE
    ended_with_the_image(feed, first)


async def test_a_stalled_body_is_taken_over_by_one_that_continues_at_the_offset(
    quick_takeover: float,
) -> None:
    parks = Parks()
    feed = feed_of(parks=parks)
    transfer = Transfer(feed)
    first = await feed.attach(MemoryBody(IMAGE[:500]), 0, len(IMAGE))
    await transfer.has(500)
    await wait_until_async(lambda: first.stalled, SOON, what="the first body to stall")
    second = await feed.attach(MemoryBody(IMAGE[500:], b""), 500, len(IMAGE))
    assert first.end.result() is BodyEnd.TAKEN_OVER
    assert parks.heard == [BodyEnd.TAKEN_OVER, None]
    assert await transfer.result() == IMAGE
    ended_with_the_image(feed, second)


async def test_a_stalled_body_is_not_taken_over_from_another_offset(
    quick_takeover: float,
) -> None:
    feed = feed_of()
    transfer = Transfer(feed)
    first = await feed.attach(MemoryBody(IMAGE[:500]), 0, len(IMAGE))
    await transfer.has(500)
    await wait_until_async(lambda: first.stalled, SOON, what="the first body to stall")
    with pytest.raises(OffsetMismatch) as refused:
        await feed.attach(MemoryBody(IMAGE[400:]), 400, len(IMAGE))
    # The newcomer cut the stalled body before its offset was compared: the transfer
    # waits for one at 500.
    assert refused.value.offset == 500
    assert first.end.result() is BodyEnd.TAKEN_OVER
    await feed.attach(MemoryBody(IMAGE[500:], b""), 500, len(IMAGE))
    assert await transfer.result() == IMAGE


# -- the server stopping, the transfer ending ---------------------------------------------


async def test_suspending_cuts_the_body_and_the_transfer_hears_suspended() -> None:
    parks = Parks()
    feed = feed_of(parks=parks)
    transfer = Transfer(feed)
    body = await feed.attach(MemoryBody(IMAGE[:300]), 0, len(IMAGE))
    await transfer.has(300)
    feed.suspend()
    with pytest.raises(Suspended, match="continues at byte 300"):
        await transfer.result()
    assert body.end.result() is BodyEnd.STOPPED
    assert parks.heard == []


async def test_closing_lets_the_attached_body_go_and_refuses_the_next() -> None:
    feed = feed_of()
    body = await feed.attach(MemoryBody(IMAGE[:300]), 0, len(IMAGE))
    feed.close()
    assert body.end.result() is BodyEnd.STOPPED
    assert feed.attached is None
    with pytest.raises(OffsetMismatch):
        await feed.attach(MemoryBody(IMAGE), 0, len(IMAGE))
