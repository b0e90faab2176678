"""One pass over an image file whose parts lie at offsets its own tables name.

VMDK, VDI, VHD and VHDX files are headers, tables and data blocks at offsets written in
other headers and tables. A converter reads them in one pass by *claiming* byte ranges of
the stream as it learns where they are:

- `capture`: a small structure (header, table) handed over whole once its bytes are in;
- `stream`: a large table handed over in pieces of whole entries as they arrive;
- `place`: guest data, written to the target at a guest offset straight from the input.

Claims never overlap: each byte of the stream belongs to at most one claim, so a table
that points two blocks at the same bytes, or a block into a header, is refused.

Until the converter knows where all its data lies (`complete`), bytes no claim has taken
yet are kept in a bounded `Spill` (importer.formats.spill: memory, then a side file),
because a table found later may still claim them. A claim for bytes already passed is
served from the spill. Once complete, unclaimed bytes are padding or structures nobody
needs, and are dropped.
"""

from __future__ import annotations

import functools
import heapq
import itertools
from array import array
from collections.abc import Callable, Iterator
from typing import Any, Final

from importer.errors import InvalidImage, UnsupportedFormat
from importer.formats.base import Converter, ImageInfo, Limits, RawTarget
from importer.formats.spill import Spill

_PLACE: Final = 0
_CAPTURE: Final = 1
_STREAM: Final = 2

# No image file is larger than this (2 PiB); offsets beyond it are corrupt.
MAX_OFFSET: Final = 1 << 51
# Data runs one conversion keeps track of: 4M runs take 96 MiB, plus 32 MiB to sort them.
# Tables written in guest order merge into far fewer runs than blocks.
RUN_INDEX_BITS: Final = 22
MAX_RUNS: Final = 1 << RUN_INDEX_BITS
# Runs are sorted by stream offset in chunks of this many, merged lazily.
_SORT_CHUNK: Final = 1 << 18


class Claim:
    """A byte range of the stream and what to do with it."""

    __slots__ = ("buf", "end", "guest", "kind", "on_data", "on_end", "rel", "start", "unit", "what")

    def __init__(self, kind: int, start: int, end: int, what: str) -> None:
        self.kind = kind
        self.start = start
        self.end = end
        self.what = what
        self.guest = 0
        self.on_data: Callable[..., None] = _nothing
        self.on_end: Callable[[], None] = _nothing
        self.unit = 1
        self.rel = 0
        self.buf = _NO_BYTES  # captures and streams get their own buffer


def _nothing(*_args: object) -> None:
    return None


_NO_BYTES: Final = bytearray()


def place_claim(start: int, length: int, guest: int, what: str) -> Claim:
    claim = Claim(_PLACE, start, start + length, what)
    claim.guest = guest
    return claim


def capture_claim(start: int, length: int, what: str, on_data: Callable[[bytes], None]) -> Claim:
    claim = Claim(_CAPTURE, start, start + length, what)
    claim.on_data = on_data
    claim.buf = bytearray()
    return claim


class StreamLayout:
    """Routes the bytes of one image stream to the claims a converter registers."""

    def __init__(self, fmt: str, target: RawTarget, limits: Limits) -> None:
        self.fmt = fmt
        self.target = target
        self.pos = 0  # stream offset of the next byte fed
        # Set by the converter once every byte it will need is claimed or will be claimed
        # ahead of the stream position.
        self.complete = False
        self._heap: list[tuple[int, int, Claim, Iterator[Claim] | None]] = []
        self._seq = itertools.count()
        self._current: Claim | None = None
        self.claimed_end = 0  # end of the last claim that took live bytes
        self.spill = Spill(limits.spill_memory, limits.spill_dir)

    # -- registering claims -------------------------------------------------------------

    def add(self, claim: Claim) -> None:
        if claim.end <= claim.start:
            raise InvalidImage(f"{self.fmt}: {claim.what} at {claim.start:#x} has no length")
        heapq.heappush(self._heap, (claim.start, next(self._seq), claim, None))

    def add_sorted(self, claims: Iterator[Claim]) -> None:
        """Registers claims produced lazily, in increasing offset order."""
        first = next(claims, None)
        if first is not None:
            heapq.heappush(self._heap, (first.start, next(self._seq), first, claims))

    def capture(self, start: int, length: int, what: str, on_data: Callable[[bytes], None]) -> None:
        """`on_data(bytes)` once all `length` bytes at `start` are in."""
        self.add(capture_claim(start, length, what, on_data))

    def stream(
        self,
        start: int,
        length: int,
        what: str,
        unit: int,
        on_data: Callable[[int, memoryview | bytes], None],
        on_end: Callable[[], None],
    ) -> None:
        """`on_data(relative_offset, piece)` with pieces of whole `unit`s as they arrive,
        then `on_end()`. Pieces are only valid during the call."""
        if length % unit:
            raise InvalidImage(f"{self.fmt}: {what} length {length} is not a multiple of {unit}")
        claim = Claim(_STREAM, start, start + length, what)
        claim.buf = bytearray()
        claim.unit = unit
        claim.on_data = on_data
        claim.on_end = on_end
        self.add(claim)

    def place(self, start: int, length: int, guest: int, what: str) -> None:
        self.add(place_claim(start, length, guest, what))

    # -- consuming the stream -----------------------------------------------------------

    def feed(self, view: memoryview) -> None:
        while len(view):
            claim = self._current
            if claim is None:
                claim = self._current = self._next_live()
            if claim is None or claim.start >= self.pos + len(view):
                self._unclaimed(view)
                self.pos += len(view)
                return
            if claim.start > self.pos:
                gap = claim.start - self.pos
                self._unclaimed(view[:gap])
                view = view[gap:]
                self.pos = claim.start
            n = min(len(view), claim.end - self.pos)
            self._consume(claim, self.pos, view[:n])
            view = view[n:]
            self.pos += n
            if self.pos == claim.end:
                self._current = None
                self._complete(claim)

    def finish(self, optional: Claim | None = None) -> None:
        """The stream ended: every claim must have been satisfied, except `optional` if it
        has not begun (a marker that may or may not follow the last grain)."""
        if self._current is None:
            self._current = self._next_live()
        claim = self._current
        if claim is optional and claim is not None and claim.start >= self.pos and not self._heap:
            return
        if claim is not None:
            raise InvalidImage(
                f"{self.fmt}: the image is truncated: it ends at byte {self.pos:#x}, "
                f"but {claim.what} spans {claim.start:#x}-{claim.end:#x}"
            )

    def close(self) -> None:
        self.spill.clear()

    def _next_live(self) -> Claim | None:
        """The next claim that starts at or after the stream position, after serving from
        the spill every claim that starts before it."""
        while self._heap:
            if self._heap[0][0] >= self.pos:
                if self.complete:
                    self.spill.clear()
                claim = self._pop()
                self.claimed_end = claim.end
                return claim
            claim = self._pop()
            end = min(claim.end, self.pos)
            if not self.spill.covers(claim.start, end):
                raise InvalidImage(
                    f"{self.fmt}: {claim.what} at {claim.start:#x}-{claim.end:#x} overlaps "
                    "another structure of the image"
                )
            for offset, piece in self.spill.pop(claim.start, end):
                self._consume(claim, offset, memoryview(piece))
            if claim.end > self.pos:
                self.claimed_end = claim.end
                return claim
            self._complete(claim)
        if self.complete:
            self.spill.clear()
        return None

    def _pop(self) -> Claim:
        start, _, claim, rest = heapq.heappop(self._heap)
        if rest is not None:
            following = next(rest, None)
            if following is not None:
                if following.start < start:
                    raise InvalidImage(f"{self.fmt}: {following.what} is out of order")
                heapq.heappush(self._heap, (following.start, next(self._seq), following, rest))
        return claim

    def _unclaimed(self, view: memoryview) -> None:
        if not self.complete:
            self.spill.add(self.pos, view)

    def _consume(self, claim: Claim, offset: int, view: memoryview) -> None:
        kind = claim.kind
        if kind == _PLACE:
            self.target.write(claim.guest + (offset - claim.start), view)
        elif kind == _CAPTURE:
            claim.buf += view
        else:
            buf = claim.buf
            unit = claim.unit
            if buf:
                need = unit - len(buf)
                buf += view[:need]
                view = view[need:]
                if len(buf) < unit:
                    return
                claim.on_data(claim.rel, bytes(buf))
                claim.rel += unit
                buf.clear()
            whole = len(view) - len(view) % unit
            if whole:
                claim.on_data(claim.rel, view[:whole])
                claim.rel += whole
            if whole < len(view):
                buf += view[whole:]

    def _complete(self, claim: Claim) -> None:
        if claim.kind == _CAPTURE:
            data = bytes(claim.buf)
            claim.buf = _NO_BYTES
            claim.on_data(data)
        elif claim.kind == _STREAM:
            claim.on_end()


class RunMap:
    """Where data lies in the stream and where it goes on the guest disk, built entry by
    entry from a format's table and merged into runs where both sides are contiguous.
    Arrays keep it at 24 bytes per run whatever the table size."""

    def __init__(self, fmt: str, merge: bool = True) -> None:
        self.fmt = fmt
        self.merge = merge
        self.starts = array("q")
        self.guests = array("q")
        self.lengths = array("q")
        self.in_order = True

    def __len__(self) -> int:
        return len(self.starts)

    def add(self, start: int, guest: int, length: int) -> None:
        """Adds `length` bytes at stream offset `start` (a multiple of 512) for `guest`."""
        if start >= MAX_OFFSET or start % 512:
            raise InvalidImage(f"{self.fmt}: data at {start:#x} lies past any possible file size")
        if self.starts:
            last = len(self.starts) - 1
            end = self.starts[last] + self.lengths[last]
            if self.merge and end == start and self.guests[last] + self.lengths[last] == guest:
                self.lengths[last] += length
                return
            if start < self.starts[last]:
                self.in_order = False
        if len(self.starts) == MAX_RUNS:
            raise UnsupportedFormat(
                f"{self.fmt}: the image's data lies in more than {MAX_RUNS} separate pieces, "
                "more than a one-pass conversion keeps track of; convert it with qemu-img first"
            )
        self.starts.append(start)
        self.guests.append(guest)
        self.lengths.append(length)

    def in_stream_order(self) -> StreamOrder:
        """(stream offset, guest offset, length) by increasing stream offset."""
        return StreamOrder(self)

    def place_claims(self, what: str, block_size: int) -> ClaimSource:
        """Place claims for every run, in stream order, named after their first block."""
        return ClaimSource(self.in_stream_order(), functools.partial(_place_run, what, block_size))

    def regions(self) -> Iterator[tuple[int, int]]:
        for i in range(len(self.starts)):
            yield self.starts[i], self.starts[i] + self.lengths[i]


def _place_run(what: str, block_size: int, run: tuple[int, int, int]) -> Claim:
    start, guest, length = run
    return place_claim(start, length, guest, f"{what} {guest // block_size}")


class StreamOrder:
    """The runs of a RunMap by increasing stream offset, as (stream offset, guest offset,
    length). An iterator that, unlike a generator, can be pickled with the converter that
    holds it (importer.formats.snapshot); the map must not change while it is in use."""

    def __init__(self, runs: RunMap) -> None:
        self.runs = runs
        self.sorted = runs.in_order
        self.next = 0  # in a map built in stream order: the index of the next run
        self.chunks: list[array[int]] = []
        self.heap: list[tuple[int, int, int]] = []  # (key, chunk, position in the chunk)
        if self.sorted:
            return
        # Sort 64-bit keys (sector << index bits | index) chunk by chunk, so the temporary
        # Python objects of a sort stay small, then merge the sorted chunks lazily.
        starts = runs.starts
        for low in range(0, len(starts), _SORT_CHUNK):
            high = min(len(starts), low + _SORT_CHUNK)
            keys = sorted((starts[i] >> 9) << RUN_INDEX_BITS | i for i in range(low, high))
            self.chunks.append(array("Q", keys))
        self.heap = [(chunk[0], n, 0) for n, chunk in enumerate(self.chunks)]
        heapq.heapify(self.heap)

    def __iter__(self) -> StreamOrder:
        return self

    def __next__(self) -> tuple[int, int, int]:
        runs = self.runs
        if self.sorted:
            i = self.next
            if i >= len(runs.starts):
                raise StopIteration
            self.next = i + 1
        else:
            if not self.heap:
                raise StopIteration
            key, n, pos = self.heap[0]
            chunk = self.chunks[n]
            if pos + 1 < len(chunk):
                heapq.heapreplace(self.heap, (chunk[pos + 1], n, pos + 1))
            else:
                heapq.heappop(self.heap)
            i = key & (MAX_RUNS - 1)
        return runs.starts[i], runs.guests[i], runs.lengths[i]


class ClaimSource:
    """Claims made lazily, one by `make(item)` for each item of `items`, for
    `StreamLayout.add_sorted`. Unlike a generator it can be pickled with the converter
    that holds it (importer.formats.snapshot), when `items` (a list or array iterator, a
    `StreamOrder`) and `make` (a bound method, a partial of a function) can."""

    __slots__ = ("items", "make")

    def __init__(self, items: Iterator[Any], make: Callable[..., Claim]) -> None:
        self.items = items
        self.make = make

    def __iter__(self) -> ClaimSource:
        return self

    def __next__(self) -> Claim:
        return self.make(next(self.items))


class LayoutConverter(Converter):
    """A converter that reads its format through a `StreamLayout`: subclasses register
    claims, set `virtual_size`, and check the end of the stream in `check_end`."""

    def __init__(self, target: RawTarget, limits: Limits) -> None:
        super().__init__(target, limits)
        self.layout = StreamLayout(self.format, target, limits)
        self.virtual_size = 0

    def feed(self, data: memoryview) -> None:
        try:
            self.layout.feed(data)
        except BaseException:
            self.layout.close()
            raise

    def finish(self) -> ImageInfo:
        try:
            self.check_end()
        finally:
            self.layout.close()
        return ImageInfo(format=self.format, virtual_size=self.virtual_size)

    def close(self) -> None:
        """Frees the spill; for a transfer abandoned before `finish`."""
        self.layout.close()

    def check_end(self) -> None:
        """The stream ended: raise InvalidImage if the image is incomplete."""
        self.layout.finish()
