"""A TCP proxy on loopback that makes a fast server slow: what goes to the server passes at
most `rate` bytes per second (all connections together), what comes back passes freely.

Put between our server and the registry, it plays a slow DVCR: the proxy reads the next
piece only when the rate allows, so the socket buffers fill and the sender sees the same
backpressure a slow registry gives. Threads in the harness process; at 50 MB/s the
proxy needs little CPU (a few hundred reads of up to 64 KiB a second).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

from bench.process import free_port

_PIECE = 64 * 1024


class Pace:
    """A shared schedule: each piece may pass once the ones before it have had their time
    at `rate` (so bursts are at most one piece per connection)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


class ThrottledProxy:
    def __init__(self, target_port: int, rate: float) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pace = Pace(rate)
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def __enter__(self) -> ThrottledProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._spawn(self._accept, "slowproxy-accept")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        if self._listener is not None:
            _shut(self._listener)  # wakes the accepting thread; close alone would not
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _shut(sock)
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, name=name, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, server))
            ends = threading.Semaphore(0)  # released by each direction as it ends
            self._spawn(self._pump, "slowproxy-up", client, server, self.pace, ends)
            self._spawn(self._pump, "slowproxy-down", server, client, None, ends)
            self._spawn(self._close_after, "slowproxy-close", client, server, ends)

    @staticmethod
    def _pump(
        source: socket.socket, sink: socket.socket, pace: Pace | None, ends: threading.Semaphore
    ) -> None:
        try:
            while piece := source.recv(_PIECE):
                if pace is not None:
                    pace.wait(len(piece))
                sink.sendall(piece)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            # One side went away: the other direction must end too.
            _shut(sink)
            _shut(source)
        finally:
            ends.release()

    def _close_after(
        self, client: socket.socket, server: socket.socket, ends: threading.Semaphore
    ) -> None:
        ends.acquire()
        ends.acquire()
        with self._lock:
            self._sockets.difference_update((client, server))
        client.close()
        server.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
