"""TransportBody on real loopback connections: a server protocol stands for aiohttp's (it
takes the first piece, then hands the transport over), a client socket sends."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from waiting import wait_until_async

from importer.sources.transportbody import QUIET, TransportBody


class StandIn(asyncio.Protocol):
    """What a body is taken from: keeps what it receives and hears of the close."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.first = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += data
        if not self.first.done():
            assert self.transport is not None
            self.transport.pause_reading()  # the handler runs before the next piece
            self.first.set_result(bytes(data))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class Link:
    """A loopback connection: `server` the stand-in protocol, `writer` the client side."""

    def __init__(self) -> None:
        self.server: StandIn | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._listener: asyncio.Server | None = None

    async def __aenter__(self) -> Link:
        made = asyncio.get_running_loop().create_future()

        def factory() -> StandIn:
            protocol = StandIn()
            made.set_result(protocol)
            return protocol

        self._listener = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = self._listener.sockets[0].getsockname()[1]
        _, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.server = await made
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.writer is not None and self._listener is not None
        self.writer.close()
        self._listener.close()

    async def take(self, length: int) -> TransportBody:
        """After the first piece arrived: the rest of a `length`-byte body."""
        assert self.server is not None and self.server.transport is not None
        first = await self.server.first
        return TransportBody(self.server.transport, first, length)


async def read_all(body: TransportBody, size: int) -> tuple[bytes, list[int]]:
    buffer = memoryview(bytearray(size))
    out, counts = bytearray(), []
    while n := await body.readinto(buffer):
        counts.append(n)
        out += buffer[:n]
    return bytes(out), counts


@pytest.mark.parametrize("buffer_size", [1, 4096, 1 << 20])
async def test_the_body_arrives_whole_and_what_follows_is_left(buffer_size: int) -> None:
    data = os.urandom(3 << 20) if buffer_size > 1 else os.urandom(50_000)
    following = b"GET /next HTTP/1.1\r\n\r\n"
    async with Link() as link:
        assert link.writer is not None and link.server is not None
        link.writer.write(data[:100])
        body = await link.take(len(data))
        link.writer.write(data[100:] + following)
        received, counts = await read_all(body, buffer_size)
        assert received == data
        assert max(counts) <= buffer_size
        assert await body.readinto(memoryview(bytearray(10))) == 0
        body.release()
        # The stand-in gets its transport back with the next message still unread.
        assert link.server.transport is not None
        assert link.server.transport.get_protocol() is link.server
        link.server.transport.resume_reading()
        server = link.server
        await wait_until_async(
            lambda: bytes(server.received).endswith(following),
            timeout=5.0,
            what="the stand-in to receive the next message",
        )
        assert len(link.server.received) < len(data)  # the body went to the reader


async def test_a_slow_sender_s_bytes_are_handed_out_as_they_come() -> None:
    async with Link() as link:
        assert link.writer is not None
        link.writer.write(b"h" * 100)
        body = await link.take(1 << 20)
        buffer = memoryview(bytearray(1 << 20))
        assert await body.readinto(buffer) == 100  # what came first, at once
        link.writer.write(b"x" * 1000)
        started = time.monotonic()
        n = await body.readinto(buffer)
        assert n == 1000 and bytes(buffer[:n]) == b"x" * 1000
        assert time.monotonic() - started < QUIET + 1  # not held until the buffer is full


async def test_a_broken_connection_gives_the_bytes_before_the_break_then_an_error() -> None:
    async with Link() as link:
        assert link.writer is not None and link.server is not None
        link.writer.write(b"a" * 1000)
        body = await link.take(10_000)
        buffer = memoryview(bytearray(10_000))
        assert await body.readinto(buffer) == 1000
        link.writer.write(b"b" * 2000)
        assert await body.readinto(buffer) == 2000
        link.writer.transport.abort()
        with pytest.raises(ConnectionResetError, match=r"after 3000 of 10000 bytes"):
            await body.readinto(buffer)
        body.release()  # the stand-in hears of the lost connection
        await asyncio.wait_for(link.server.lost, 5)


async def test_a_sender_that_closes_early_is_a_break() -> None:
    async with Link() as link:
        assert link.writer is not None
        link.writer.write(b"a" * 100)
        body = await link.take(1000)
        link.writer.write_eof()
        with pytest.raises(ConnectionResetError, match=r"after 100 of 1000 bytes"):
            await read_all(body, 4096)


async def test_release_ends_a_waiting_read() -> None:
    async with Link() as link:
        assert link.writer is not None and link.server is not None
        link.writer.write(b"a")
        body = await link.take(1000)
        buffer = memoryview(bytearray(1000))
        assert await body.readinto(buffer) == 1
        read = asyncio.create_task(body.readinto(buffer))
        await asyncio.sleep(0.05)  # on purpose: the read has time to end, and must not
        assert not read.done()
        body.release()
        with pytest.raises(ConnectionResetError):
            await read
        assert link.server.transport is not None
        assert link.server.transport.get_protocol() is link.server


async def test_discarding_the_rest_ends_when_the_sender_closes() -> None:
    async with Link() as link:
        assert link.writer is not None
        link.writer.write(b"h" * 100)
        body = await link.take(10 << 20)
        link.writer.write(bytes(3 << 20))
        link.writer.write_eof()
        started = time.monotonic()
        await body.discard_rest(30.0)
        assert time.monotonic() - started < 10.0
        assert body.unread > 0  # the sender stopped short of its length


async def test_discarding_the_rest_of_a_sender_that_never_stops_ends_in_time() -> None:
    async with Link() as link:
        assert link.writer is not None
        writer = link.writer
        writer.write(b"h" * 100)
        body = await link.take(1 << 40)

        async def trickle() -> None:
            while True:
                writer.write(bytes(1024))
                await asyncio.sleep(0.01)

        sender = asyncio.ensure_future(trickle())
        try:
            started = time.monotonic()
            await body.discard_rest(0.5)
            assert 0.4 < time.monotonic() - started < 5.0
            assert body.unread > 0
        finally:
            sender.cancel()
        body.release()
