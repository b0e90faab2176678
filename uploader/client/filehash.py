"""The sha256 of what an upload sends, computed off the event loop.

A regular file is hashed by a thread of its own that reads the file by position: it does
not depend on what the connections carried, so an upload that resumes (in this run or in a
later one) still gets the hash of the whole file, the part sent before included. The thread
stays just behind the reads of the upload, so it finds the data in the page cache instead
of reading a large file from disk twice. A pipe or a device cannot be read twice: it is
hashed as the upload reads it (`StreamHasher`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import threading
from typing import BinaryIO

CHUNK = 1 << 20


class FileHasher:
    """sha256 of the first `size` bytes of a regular file, in a thread of its own, reading
    no further than `allow` lets it."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = os.dup(fd)
        self.size = size
        self._limit = 0
        self._closed = False
        self._ready = threading.Condition()
        self._result: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def allow(self, offset: int) -> None:
        """The thread may hash up to `offset`."""
        with self._ready:
            if offset > self._limit:
                self._limit = min(offset, self.size)
                self._ready.notify()

    async def hexdigest(self) -> str:
        """Hashes to the end and gives the result; OSError when the file could not be read
        or got shorter."""
        self.allow(self.size)
        return await asyncio.wrap_future(self._result)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _run(self) -> None:
        digest = hashlib.sha256()
        position = 0
        try:
            while position < self.size:
                with self._ready:
                    while not self._closed and self._limit <= position:
                        self._ready.wait()
                    if self._closed:
                        return
                    limit = self._limit
                while position < limit:
                    data = os.pread(self._fd, min(CHUNK, limit - position), position)
                    if not data:
                        raise OSError(f"the file ended at byte {position}, not {self.size}")
                    digest.update(data)
                    position += len(data)
            self._result.set_result(digest.hexdigest())
        except OSError as exc:
            self._result.set_exception(exc)
        finally:
            os.close(self._fd)
            if not self._result.done():
                self._result.cancel()


class StreamHasher:
    """sha256 of a stream that is read once, hashed as it is read. Reads go through one
    thread so that they, and the hash, keep the stream's order."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._digest = hashlib.sha256()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stdin")

    async def read(self, size: int) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._read, size)

    def _read(self, size: int) -> bytes:
        data = self._stream.read(size)
        self._digest.update(data)
        return data

    async def hexdigest_of_the_rest(self) -> str:
        """Reads what is left of the stream, unsent, for its hash."""
        while await self.read(CHUNK):
            pass
        return self._digest.hexdigest()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
