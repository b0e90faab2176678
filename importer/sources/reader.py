"""What the pipeline reads from: a `Reader` fills the caller's buffer.

Sources that receive from a socket fill the pipeline's blocks themselves (see
`importer.sources.transportbody`); sources that come as pieces (files, layers, aiohttp's
streams) are read through a `ChunkReader`, which copies each piece out as asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol, runtime_checkable

from importer.formats.base import Buffer


@runtime_checkable
class Reader(Protocol):
    async def readinto(self, view: memoryview) -> int:
        """Puts the next bytes at the front of `view` and says how many (at least one,
        at most `len(view)`); 0 once the stream has ended."""
        ...


ByteStream = AsyncIterable[Buffer] | Reader


class ChunkReader:
    """A Reader over a stream of pieces."""

    def __init__(self, chunks: AsyncIterable[Buffer]) -> None:
        self._chunks: AsyncIterator[Buffer] = aiter(chunks)
        self._rest = memoryview(b"")

    async def readinto(self, view: memoryview) -> int:
        while not self._rest:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return 0
            self._rest = memoryview(chunk).cast("B")
        n = min(len(view), len(self._rest))
        view[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


class _Empty:
    async def readinto(self, view: memoryview) -> int:
        return 0


EMPTY: Reader = _Empty()


def as_reader(stream: ByteStream) -> Reader:
    return stream if isinstance(stream, Reader) else ChunkReader(stream)
