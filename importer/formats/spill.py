"""The spill: bytes of an image stream kept until a table says whether they are needed.

A one-pass converter learns where a structure lies only once the table that points at it
has arrived; bytes that pass before that may still be claimed. They are kept here, in
stream order: in memory up to a limit, then in a side file (`SpillFile`). A claim on bytes
already passed is served with `read` (the bytes stay: another claim may want them too) or
`pop` (they are forgotten). Once the converter knows where all its data lies, the spill is
cleared at once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Final

from importer.errors import ImageTooLarge
from importer.formats.base import Buffer
from importer.formats.spillfile import SpillFile

# Bytes in the side file are read back in pieces of this size.
READ_PIECE: Final = 4 << 20


class Spill:
    """Segments of the stream [start, end), each in memory or at a position of the side
    file. `total_limit` bounds all the bytes ever added (None: no bound)."""

    def __init__(
        self,
        memory_limit: int,
        directory: str | None,
        *,
        total_limit: int | None = None,
        fmt: str = "",
        prefix: str = "spill-",
    ) -> None:
        self.memory_limit = memory_limit
        self.total_limit = total_limit
        self.fmt = fmt  # names the format in messages
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.chunks: list[bytearray | None] = []  # in memory, or None: in the file
        self.positions: list[int] = []  # in the file; -1 for a chunk in memory
        self.memory = 0
        self.total = 0
        self.file = SpillFile(directory, prefix)

    def __bool__(self) -> bool:
        return bool(self.starts)

    @property
    def file_bytes(self) -> int:
        """Bytes written to the side file since it was created (0 when there is none)."""
        return self.file.end

    def add(self, offset: int, data: memoryview) -> None:
        """Keeps the bytes at stream `offset`, after every byte added before."""
        n = len(data)
        self.total += n
        if self.total_limit is not None and self.total > self.total_limit:
            raise ImageTooLarge(
                f"{self.fmt}: more than {self.total_limit} bytes arrive before the tables "
                "that map them; the image is larger than the size limit allows"
            )
        joins = bool(self.ends) and self.ends[-1] == offset
        if self.memory + n <= self.memory_limit:
            self.memory += n
            last = self.chunks[-1] if joins else None
            if last is not None:
                last += data
                self.ends[-1] += n
            else:
                self._append(offset, n, bytearray(data), -1)
            return
        position = self.file.append(data)
        if (
            joins
            and self.chunks[-1] is None
            and self.positions[-1] + (self.ends[-1] - self.starts[-1]) == position
        ):
            self.ends[-1] += n
        else:
            self._append(offset, n, None, position)

    def covers(self, start: int, end: int) -> bool:
        """Every byte of [start, end) is kept."""
        i = bisect.bisect_right(self.starts, start) - 1
        pos = start
        while pos < end:
            if not (0 <= i < len(self.starts) and self.starts[i] <= pos < self.ends[i]):
                return False
            pos = self.ends[i]
            i += 1
        return True

    def read(self, start: int, end: int) -> Iterator[tuple[int, Buffer]]:
        """The kept bytes of [start, end) as (stream offset, piece), in order; stops short
        where they are missing (`covers` says whether they are all there)."""
        i = bisect.bisect_right(self.starts, start) - 1
        pos = start
        while pos < end and 0 <= i < len(self.starts) and self.starts[i] <= pos < self.ends[i]:
            hi = min(end, self.ends[i])
            yield from self._pieces(i, pos, hi)
            pos = hi
            i += 1

    def pop(self, start: int, end: int) -> Iterator[tuple[int, Buffer]]:
        """Like `read`, then forgets [start, end). The caller has checked `covers`."""
        first = bisect.bisect_right(self.starts, start) - 1
        last = first
        while self.ends[last] < end:
            last += 1
        kept: list[tuple[int, int, bytearray | None, int]] = []
        for i in range(first, last + 1):
            seg_start, seg_end = self.starts[i], self.ends[i]
            lo, hi = max(seg_start, start), min(seg_end, end)
            yield from self._pieces(i, lo, hi)
            if seg_start < lo:
                kept.append(self._cut(i, seg_start, lo))
            if hi < seg_end:
                kept.append(self._cut(i, hi, seg_end))
            if self.chunks[i] is not None:
                self.memory -= hi - lo
        span = slice(first, last + 1)
        self.starts[span] = [segment[0] for segment in kept]
        self.ends[span] = [segment[1] for segment in kept]
        self.chunks[span] = [segment[2] for segment in kept]
        self.positions[span] = [segment[3] for segment in kept]

    def clear(self) -> None:
        self.starts, self.ends, self.chunks, self.positions = [], [], [], []
        self.memory = 0
        self.file.close()

    def _pieces(self, i: int, lo: int, hi: int) -> Iterator[tuple[int, Buffer]]:
        """[lo, hi) of segment i."""
        base = self.starts[i]
        chunk = self.chunks[i]
        if chunk is not None:
            yield lo, memoryview(chunk)[lo - base : hi - base]
            return
        position = self.positions[i] - base
        for piece_start in range(lo, hi, READ_PIECE):
            length = min(READ_PIECE, hi - piece_start)
            yield piece_start, self.file.read(position + piece_start, length)

    def _cut(self, i: int, lo: int, hi: int) -> tuple[int, int, bytearray | None, int]:
        """[lo, hi) of segment i, as a segment of its own."""
        base = self.starts[i]
        chunk = self.chunks[i]
        if chunk is not None:
            return lo, hi, bytearray(memoryview(chunk)[lo - base : hi - base]), -1
        return lo, hi, None, self.positions[i] + lo - base

    def _append(self, offset: int, n: int, chunk: bytearray | None, position: int) -> None:
        self.starts.append(offset)
        self.ends.append(offset + n)
        self.chunks.append(chunk)
        self.positions.append(position)
