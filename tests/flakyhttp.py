"""A deliberately faulty HTTP server, and deliberately faulty proxies, for tests of
downloads and uploads that break off.

`FlakyServer` serves one file at `/file` over plain asyncio sockets (HTTP/1.1, keep-alive,
optionally TLS), with ETag, Last-Modified, Accept-Ranges and `Range: bytes=N-` with
`If-Range`, and misbehaves on purpose as its `Faults` say: it closes the connection (or
stalls) after some bytes of the body, answers error statuses first, changes the file
between requests, ignores ranges or If-Range, or sends a wrong Content-Range. Every request
is recorded for the test to look at.

`CuttingProxy` forwards TCP connections to a real server (nginx) and cuts the first ones
after some bytes of the answer, so a real server's ranges and validators can be tested.
`RequestCuttingProxy` does the same in the other direction: it cuts requests in the
middle of their bodies, for tests of uploads that break off.

None of them is meant for anything but tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Self

from waiting import wait_until_async

FILE_PATH = "/file"
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"
CHANGED_LAST_MODIFIED = "Thu, 22 Oct 2015 09:00:00 GMT"

REASONS = {
    200: "OK",
    206: "Partial Content",
    302: "Found",
    403: "Forbidden",
    404: "Not Found",
    410: "Gone",
    416: "Range Not Satisfiable",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass
class Faults:
    """How the server misbehaves. By default it behaves: a strong ETag, Last-Modified,
    `Accept-Ranges: bytes`, If-Range honoured."""

    etag: str | None = '"v1"'
    last_modified: str | None = LAST_MODIFIED
    ranges: bool = True  # advertise and honour Range; False: no header, always 200
    drop_after: int | None = None  # body bytes sent per answer before the fault...
    drops: int = 0  # ...for this many answers with a body
    stall: bool = False  # the fault: stop sending and keep the connection (else close it)
    statuses: list[int] = field(default_factory=list)  # answered, in order, before the file
    range_statuses: list[int] = field(default_factory=list)  # the same, to range requests
    changed: bytes | None = None  # from the second answer with a body on, the file is this
    ignore_if_range: bool = False  # answer 206 even when If-Range does not match
    range_shift: int = 0  # Content-Range claims to start this far from the truth
    max_range: int | None = None  # a 206 carries at most this many bytes
    chunked: bool = False  # no Content-Length: chunked transfer coding
    redirect_from: str | None = None  # a path that answers 302 to /file


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case


class FlakyServer:
    """`async with FlakyServer(data, Faults(...)) as server:` then GET `server.url`."""

    def __init__(
        self, data: bytes, faults: Faults | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.data = data
        self.faults = faults or Faults()
        self.ssl_context = ssl_context
        self.requests: list[Request] = []
        self.connections = 0
        self._answers_with_body = 0
        self._statuses = list(self.faults.statuses)
        self._range_statuses = list(self.faults.range_statuses)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{FILE_PATH}"

    def url_of(self, path: str) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> FlakyServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    def range_requests(self) -> list[Request]:
        return [r for r in self.requests if "range" in r.headers]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            await _close(writer)

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answers one request; False when the connection is to be closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        self.requests.append(Request(method, path, headers))

        f = self.faults
        if f.redirect_from is not None and path == f.redirect_from:
            await self._answer(writer, 302, {"Location": FILE_PATH})
            return True
        if path != FILE_PATH:
            await self._answer(writer, 404)
            return True
        if self._statuses:
            await self._answer(writer, self._statuses.pop(0))
            return True
        if "range" in headers and self._range_statuses:
            await self._answer(writer, self._range_statuses.pop(0))
            return True
        return await self._file(writer, headers)

    async def _answer(
        self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str] | None = None
    ) -> None:
        self._write_head(writer, status, {**(headers or {}), "Content-Length": "0"})
        await writer.drain()

    def _write_head(
        self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str]
    ) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def _file(self, writer: asyncio.StreamWriter, request: dict[str, str]) -> bool:
        f = self.faults
        data, etag, last_modified = self.data, f.etag, f.last_modified
        if f.changed is not None and self._answers_with_body >= 1:
            data, etag, last_modified = f.changed, '"v2"', CHANGED_LAST_MODIFIED
        self._answers_with_body += 1
        status, start, end = 200, 0, len(data)
        if f.ranges and request.get("range", "").startswith("bytes="):
            first = int(request["range"].removeprefix("bytes=").split("-")[0])
            if_range = request.get("if-range")
            current = if_range is None or if_range in (etag, last_modified)
            if first >= len(data):
                await self._answer(writer, 416, {"Content-Range": f"bytes */{len(data)}"})
                return True
            if current or f.ignore_if_range:
                status, start = 206, first
                if f.max_range is not None:
                    end = min(end, start + f.max_range)
        headers: dict[str, str] = {}
        if etag is not None:
            headers["ETag"] = etag
        if last_modified is not None:
            headers["Last-Modified"] = last_modified
        if f.ranges:
            headers["Accept-Ranges"] = "bytes"
        if status == 206:
            shown = start + f.range_shift
            headers["Content-Range"] = f"bytes {shown}-{shown + end - start - 1}/{len(data)}"
        if f.chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(end - start)
        self._write_head(writer, status, headers)

        body = memoryview(data)[start:end]
        faulty = f.drop_after is not None and self._answers_with_body <= f.drops
        if faulty:
            assert f.drop_after is not None
            body = body[: f.drop_after]
        for offset in range(0, len(body), 64 * 1024):
            piece = body[offset : offset + 64 * 1024]
            if f.chunked:
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            else:
                writer.write(piece)
            await writer.drain()
        if faulty:
            if f.stall:
                await self._closing.wait()
            return False
        if f.chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


class _LoopbackProxy:
    """A TCP server on a loopback port while the `async with` lasts; `_serve` handles each
    connection, and it and the tasks it leaves in `_tasks` are cancelled at the end."""

    port = 0
    _server: asyncio.Server | None = None

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """`_serve` in a task the end of the `async with` cancels and waits for (the
        server's own connection tasks are neither)."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)


class CuttingProxy(_LoopbackProxy):
    """Forwards connections to `upstream_port`; the first `cuts` connections are closed
    after `cut_after` bytes of the upstream's answer. `on_cut` runs after each cut."""

    def __init__(
        self,
        upstream_port: int,
        cut_after: int,
        cuts: int,
        on_cut: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.cuts = cuts
        self.on_cut = on_cut
        super().__init__()
        self.connections = 0
        self.cut = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        limit = self.cut_after if self.connections <= self.cuts else None
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        upstream = asyncio.ensure_future(self._pipe(reader, up_writer, None))
        self._tasks.add(upstream)
        try:
            cut = await self._pipe(up_reader, writer, limit)
        finally:
            upstream.cancel()
            self._tasks.discard(upstream)
            up_writer.transport.abort()
            await _close(writer)
        if cut:
            self.cut += 1
            if self.on_cut is not None:
                await self.on_cut()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None
    ) -> bool:
        """Copies until EOF (False) or until `limit` bytes went through (True)."""
        sent = 0
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(64 * 1024):
                if limit is not None and sent + len(data) >= limit:
                    writer.write(data[: limit - sent])
                    await writer.drain()
                    return True
                writer.write(data)
                sent += len(data)
                await writer.drain()
        return False


class RequestCuttingProxy(_LoopbackProxy):
    """A deliberately faulty proxy, for tests only: forwards TCP connections to a server
    on `upstream_port` and drops the connection (both sides) in the middle of a request
    body: the n-th request that has a body is cut after `cuts[n]` bytes of it, until the
    list is used up. Requests are parsed just enough to find their bodies
    (Content-Length; a chunked body is counted raw and ends the parsing).

    With `settle`, a cut waits until the server says (HEAD, `Upload-Offset`) that it has
    taken every byte forwarded before it, so that what the client hears next does not
    depend on how fast the server happened to be."""

    def __init__(self, upstream_port: int, cuts: list[int], settle: bool = False) -> None:
        self.upstream_port = upstream_port
        self.cuts = list(cuts)
        self.settle = settle
        self.requests: list[tuple[str, str | None]] = []  # method, Content-Range
        self.cut = 0
        super().__init__()

    def url(self, upload_url: str) -> str:
        """The same upload URL, through the proxy."""
        path = upload_url.split("/", 3)[3]
        return f"http://127.0.0.1:{self.port}/{path}"

    def puts(self) -> list[str | None]:
        return [content_range for method, content_range in self.requests if method == "PUT"]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        directions = {
            asyncio.ensure_future(self._requests(reader, up_writer)),
            asyncio.ensure_future(_copy_answers(up_reader, writer)),
        }
        self._tasks |= directions
        try:
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in directions:
                task.cancel()
            self._tasks -= directions
            writer.transport.abort()
            up_writer.transport.abort()

    async def _requests(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter) -> None:
        """Copies requests to the server; returns at the client's end or at a cut."""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                up.write(head)
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                self.requests.append((lines[0].split(" ")[0], headers.get("content-range")))
                chunked = "chunked" in headers.get("transfer-encoding", "")
                length = int(headers.get("content-length", "0"))
                limit = self.cuts.pop(0) if (length or chunked) and self.cuts else None
                left = None if chunked else length
                sent = 0
                while left is None or sent < left:
                    want = 64 * 1024 if left is None else min(64 * 1024, left - sent)
                    data = await reader.read(want)
                    if not data:
                        return
                    if limit is not None and sent + len(data) >= limit:
                        up.write(data[: limit - sent])
                        await up.drain()
                        if self.settle:
                            target = lines[0].split(" ")[1]
                            start = _body_start(headers)
                            await self._server_has(target, start + limit)
                        self.cut += 1
                        return
                    up.write(data)
                    await up.drain()
                    sent += len(data)

    async def _server_has(self, target: str, offset: int, timeout: float = 10.0) -> None:
        """Waits until a HEAD of `target` on the server answers `Upload-Offset: offset`
        or more."""

        async def reached() -> bool:
            return await _upload_offset(self.upstream_port, target) >= offset

        await wait_until_async(reached, timeout, what=f"the server to have {offset} bytes")


def _body_start(headers: dict[str, str]) -> int:
    """Where in the upload a request's body starts: its Content-Range or Upload-Offset."""
    content_range = headers.get("content-range", "")
    if content_range.startswith("bytes ") and "-" in content_range:
        return int(content_range[len("bytes ") :].split("-", 1)[0])
    return int(headers.get("upload-offset", "0"))


async def _upload_offset(port: int, target: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"HEAD {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    finally:
        writer.close()
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "upload-offset":
            return int(value.strip())
    return -1


async def _copy_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Closes after what was written has gone out (abort() would throw it away)."""
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def closed_port() -> int:
    """A loopback port nobody listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
