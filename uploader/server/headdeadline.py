"""A deadline for a connection's first request head.

aiohttp closes a connection that idles between requests (its keep-alive timeout), but not
one that opened and then trickles the head of its first request a byte at a time: a few
hundred such connections would hold the server's descriptors for as long as their senders
like. Each connection of a `HeadDeadlineSite` is closed when no request head has arrived
within `header_timeout` of its opening. Later requests on the same connection are bounded
by the keep-alive timeout, which runs from the end of the previous answer.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web

from uploader.errors import Handler


class _DeadlineProtocol(asyncio.Protocol):
    """Passes everything to aiohttp's protocol; closes the connection at the deadline
    unless a request head came first."""

    __slots__ = ("_inner", "_timeout", "_timer", "_transport")

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)
        self._inner.connection_made(transport)

    def head_received(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_received()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class HeadDeadlineSite(web.SockSite):
    """A listening socket whose connections get `_DeadlineProtocol`."""

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, header_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(runner, sock, **kwargs)
        self._header_timeout = header_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        timeout = self._header_timeout
        factory: Callable[[], asyncio.Protocol] = lambda: _DeadlineProtocol(server(), timeout)  # noqa: E731
        self._server = await asyncio.get_running_loop().create_server(
            factory, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog
        )


@web.middleware
async def head_received_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    if isinstance(protocol, _DeadlineProtocol):
        protocol.head_received()
    return await handler(request)
