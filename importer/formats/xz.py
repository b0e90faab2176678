"""xz streams, decompressed on every core when their blocks allow it.

`xz -T0` (the default since xz 5.6) cuts its output into independent blocks and writes each
block's compressed and uncompressed size in its header. Such a stream is cut here at block
boundaries as it arrives; each block is wrapped into a one-block xz stream of its own (the
same header and check, a one-record index, a footer) and decompressed by liblzma on a
worker thread (liblzma releases the GIL), a few blocks at a time, and the results are
handed on in order. liblzma still checks every block's header, data and check; the real
index and footer are checked here against the blocks seen.

A stream whose first block does not give its sizes (plain `xz`, single-threaded), or whose
blocks are too large to hold a few in memory, is decompressed the usual way, one piece at
a time. Memory: at most `MAX_IN_FLIGHT` blocks of at most `MAX_BLOCK` bytes, each held
compressed and then decompressed, plus the block being received.

A decoder of blocks can be saved between two feeds (importer.formats.snapshot): once
`settle()` has handed on the blocks in flight, all it holds is plain data (the headers
parsed, the sizes of the blocks seen, the part of the block being received). A stream
decoded the usual way holds liblzma's state, which cannot be saved.
"""

from __future__ import annotations

import collections
import concurrent.futures
import lzma
import os
import pickle
import struct
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, Literal

from importer.errors import InvalidImage
from importer.formats.base import PIECE, Buffer, MiB

MAGIC: Final = b"\xfd7zXZ\x00"
FOOTER_MAGIC: Final = b"YZ"
STREAM_HEADER_SIZE: Final = 12
MAX_BLOCK: Final = 32 * MiB  # uncompressed; xz -T0 at the default preset makes 24 MiB
MAX_IN_FLIGHT: Final = 2
XZ_MEMORY_LIMIT: Final = 256 * MiB

# Headers, indexes and padding are parsed from at most this much input at a time.
PARSE_SLICE: Final = 64 * 1024
# The first input slice of a stream decoded the usual way (see _start_sequential).
FIRST_SLICE: Final = 4 * 1024

_STREAM_START, _BLOCKS, _SEQUENTIAL, _PADDING = range(4)

# Threads that decode blocks, shared by every decoder in the process: a decoder waiting for
# its next bytes holds none.
_block_pool: ThreadPoolExecutor | None = None
_block_pool_lock = threading.Lock()


def _block_workers() -> ThreadPoolExecutor:
    global _block_pool
    with _block_pool_lock:
        if _block_pool is None:
            workers = min(os.cpu_count() or 1, 4)
            _block_pool = ThreadPoolExecutor(workers, thread_name_prefix="xz")
        return _block_pool


def check_size(check_type: int) -> int:
    """Bytes of the check field after each block, by the stream's check type."""
    return 0 if check_type == 0 else 4 << ((check_type - 1) // 3)


class _Short(Exception):
    """More bytes are needed."""


def _vli(data: Buffer, pos: int) -> tuple[int, int]:
    """A variable-length integer at `pos`: (value, position after it); _Short when `data`
    ends inside it."""
    value = 0
    for i in range(9):
        if pos + i >= len(data):
            raise _Short
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise InvalidImage("xz: a number in a header is too long")


def _encode_vli(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _pad4(n: int) -> int:
    return -n % 4


def _index(records: list[tuple[int, int]]) -> bytes:
    """An xz index: indicator, record count, (unpadded, uncompressed) sizes, padding, CRC."""
    body = bytearray(b"\x00")
    body += _encode_vli(len(records))
    for unpadded, uncompressed in records:
        body += _encode_vli(unpadded) + _encode_vli(uncompressed)
    body += bytes(_pad4(len(body)))
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def _footer(index_size: int, flags: bytes) -> bytes:
    tail = struct.pack("<I", index_size // 4 - 1) + flags
    return struct.pack("<I", zlib.crc32(tail)) + tail + FOOTER_MAGIC


class _Block:
    """A block whose header gives both sizes, as a one-block stream of its own: stream
    header, block header, the block's data, padding and check (its body, as received),
    then an index and a footer made for it."""

    def __init__(
        self, stream_header: bytes, header: bytes, compressed: int, uncompressed: int, check: int
    ) -> None:
        self.header = header
        self.uncompressed = uncompressed
        self.unpadded = len(header) + compressed + check
        self.head = stream_header + header
        self.body_size = compressed + _pad4(compressed) + check
        index = _index([(self.unpadded, uncompressed)])
        self.tail = index + _footer(len(index), stream_header[6:8])
        self.received = 0  # bytes of the body
        self.stream: bytearray | None = None  # the whole stream, for a block held to decode
        # set for a block too large to hold: decoded as it arrives, in the lane's thread
        self.decoder: lzma.LZMADecompressor | None = None

    def hold(self) -> None:
        """Gather the body in one buffer of the stream's exact size."""
        self.stream = bytearray(len(self.head) + self.body_size + len(self.tail))
        self.stream[: len(self.head)] = self.head
        self.stream[len(self.stream) - len(self.tail) :] = self.tail

    def take(self, data: memoryview) -> None:
        assert self.stream is not None
        at = len(self.head) + self.received
        self.stream[at : at + len(data)] = data
        self.received += len(data)

    def missing(self) -> int:
        return self.body_size - self.received

    def __getstate__(self) -> dict[str, object]:
        """Of a block held to decode, only the part received so far is saved (without
        a copy: it may be some MiB)."""
        state = self.__dict__.copy()
        if self.stream is not None:
            received = memoryview(self.stream)[: len(self.head) + self.received]
            state["stream"] = pickle.PickleBuffer(received)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        if self.stream is not None:
            received = self.stream
            self.hold()
            self.stream[: len(received)] = received


def _decode_block(stream: bytearray, expected: int) -> list[bytes]:
    """A one-block stream's data, in pieces of at most PIECE (never joined: no second copy
    of the block in memory)."""
    decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMORY_LIMIT)
    pieces: list[bytes] = []
    data: Buffer = stream
    try:
        while not decoder.eof:
            piece = decoder.decompress(data, PIECE)
            data = b""
            if not piece and decoder.needs_input:
                raise InvalidImage("xz: a block ends early")
            pieces.append(piece)
    except lzma.LZMAError as exc:
        raise InvalidImage(f"xz: the compressed stream is corrupt: {exc}") from exc
    if sum(map(len, pieces)) != expected:
        raise InvalidImage("xz: a block is not the size its header gives")
    return pieces


class XzDecoder:
    """Push decoder of one or more concatenated xz streams (then zero padding); calls
    `emit` with the decompressed data, in order, in pieces of at most PIECE bytes."""

    def __init__(
        self,
        emit: Callable[[Buffer], None],
        workers: int | None = None,
        max_block: int = MAX_BLOCK,
        on_unit: Callable[[], None] | None = None,
    ) -> None:
        """`on_unit()` hears of each stream and each block (of a stream decoded block by
        block) that begins."""
        self.emit = emit
        self.on_unit = on_unit
        self.workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
        self.max_block = max_block
        self.streams = 0
        self.parallel_blocks = 0  # blocks decoded on a worker (for tests and figures)
        self._state = _STREAM_START
        self._pending = bytearray()  # bytes not yet parsed (headers, index, footer)
        self._stream_header = b""
        self._block: _Block | None = None
        self._records: list[tuple[int, int]] = []
        self._sequential: lzma.LZMADecompressor | None = None
        self._slice = PIECE  # of input for the sequential decoder
        self._in_flight: collections.deque[Future[list[bytes]]] = collections.deque()

    # -- input --------------------------------------------------------------------------

    def feed(self, data: Buffer) -> None:
        # Views still to feed, the next one last. Headers are parsed from a bounded slice
        # at a time: a stream of tiny streams or blocks must not cost a copy of the rest of
        # the input each.
        views = [memoryview(data).cast("B")]
        while views:
            view = views.pop()
            while len(view):
                if self._state == _SEQUENTIAL:
                    view = self._feed_sequential(view)
                elif self._state == _BLOCKS and self._block is not None:
                    view = self._feed_block(view)
                elif self._state == _PADDING:
                    view = self._feed_padding(view)
                else:
                    self._pending += view[:PARSE_SLICE]
                    view = view[PARSE_SLICE:]
                    rest = self._parse()
                    if rest:
                        if len(view):
                            views.append(view)
                        view = memoryview(rest)

    def finish(self) -> None:
        if self._state == _PADDING and not self._pending:
            self._drain(0)
            return
        raise InvalidImage("xz: the compressed stream is truncated")

    def settle(self) -> None:
        """Hands on every block in flight (between two feeds)."""
        self._drain(0)

    def __getstate__(self) -> dict[str, object]:
        """For a snapshot, after `settle()`."""
        if self._in_flight:
            raise RuntimeError("the xz decoder has blocks in flight: settle() it first")
        return {**self.__dict__, "_in_flight": None}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._in_flight = collections.deque()

    def close(self) -> None:
        """Drops the blocks in flight; returns once none of them is decoded any more."""
        for future in self._in_flight:
            future.cancel()
        concurrent.futures.wait(self._in_flight)
        self._in_flight.clear()

    # -- parsing ------------------------------------------------------------------------

    def _parse(self) -> bytes:
        """Parses what `_pending` holds as far as it can; returns bytes that belong to the
        next state (the body of a block, or a sequential stream)."""
        while True:
            if self._state == _STREAM_START:
                if len(self._pending) < STREAM_HEADER_SIZE + 1:
                    return b""
                if self._pending[:6] != MAGIC:
                    raise InvalidImage("xz: a stream does not start with the xz magic")
                header = bytes(self._pending[:STREAM_HEADER_SIZE])
                if zlib.crc32(header[6:8]) != struct.unpack("<I", header[8:12])[0]:
                    raise InvalidImage("xz: the stream header is corrupt")
                self._stream_header = header
                block = None
                if self._pending[STREAM_HEADER_SIZE] != 0:  # else: a stream without blocks
                    block = self._block_header(STREAM_HEADER_SIZE)
                    if block is None:
                        return b""
                    if block is False or block.uncompressed > self.max_block:
                        self._begin_unit()
                        return self._start_sequential()
                self._begin_unit()
                self._state = _BLOCKS
                self._records = []
                del self._pending[:STREAM_HEADER_SIZE]
            if self._state != _BLOCKS:
                return b""
            if not self._pending:
                return b""
            if self._pending[0] == 0:
                if not self._parse_index_and_footer():
                    return b""
                rest = bytes(self._pending)  # padding, or the next stream
                self._pending.clear()
                return rest
            block = self._block_header(0)
            if block is None:
                return b""
            self._begin_unit()
            if block is False:
                raise InvalidImage(
                    "xz: a block without its sizes follows blocks with sizes; this server "
                    "decodes such streams only when every block gives its sizes"
                )
            if block.uncompressed > self.max_block:
                self._drain(0)  # what comes before goes on first
                block.decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMORY_LIMIT)
                self._pass_through(block.decoder, block.head)
            else:
                block.hold()
            self._block = block
            del self._pending[: len(block.header)]
            rest = bytes(self._pending)
            self._pending.clear()
            return rest

    def _block_header(self, at: int) -> _Block | Literal[False] | None:
        """The block whose header starts at `at` in `_pending`; None until the header is
        all there; False for a block that does not give its sizes or is too large."""
        size = (self._pending[at] + 1) * 4
        if len(self._pending) < at + size:
            return None
        header = bytes(self._pending[at : at + size])
        if zlib.crc32(header[:-4]) != struct.unpack("<I", header[-4:])[0]:
            raise InvalidImage("xz: a block header is corrupt")
        flags = header[1]
        if not flags & 0x40 or not flags & 0x80:
            return False
        try:
            compressed, pos = _vli(header, 2)
            uncompressed, _ = _vli(header, pos)
        except _Short:
            raise InvalidImage("xz: a block header is corrupt") from None
        check = check_size(self._stream_header[7] & 0x0F)
        return _Block(self._stream_header, header, compressed, uncompressed, check)

    def _feed_block(self, view: memoryview) -> memoryview:
        block = self._block
        assert block is not None
        n = min(len(view), block.missing())
        if block.decoder is None:
            block.take(view[:n])
        else:
            self._pass_through(block.decoder, view[:n])
            block.received += n
        if not block.missing():
            self._records.append((block.unpadded, block.uncompressed))
            if block.decoder is None:
                self._submit(block)
            else:
                self._pass_through(block.decoder, block.tail)
                if not block.decoder.eof:
                    raise InvalidImage("xz: a block is not the size its header gives")
            self._block = None
        return view[n:]

    def _parse_index_and_footer(self) -> bool:
        """The stream's index and footer, checked against the blocks seen; False until
        they are all there."""
        pending = self._pending
        try:
            count, pos = _vli(pending, 1)
            if count != len(self._records):
                raise InvalidImage("xz: the index does not match the blocks of the stream")
            records = []
            for _ in range(count):
                unpadded, pos = _vli(pending, pos)
                uncompressed, pos = _vli(pending, pos)
                records.append((unpadded, uncompressed))
        except _Short:
            return False
        index_size = pos + _pad4(pos) + 4
        if len(pending) < index_size + STREAM_HEADER_SIZE:
            return False
        if records != self._records:
            raise InvalidImage("xz: the index does not match the blocks of the stream")
        (crc,) = struct.unpack_from("<I", pending, index_size - 4)
        if zlib.crc32(pending[: index_size - 4]) != crc:
            raise InvalidImage("xz: the index is corrupt")
        footer = bytes(pending[index_size : index_size + STREAM_HEADER_SIZE])
        if footer != _footer(index_size, self._stream_header[6:8]):
            raise InvalidImage("xz: the stream footer is corrupt")
        del pending[: index_size + STREAM_HEADER_SIZE]
        self.streams += 1
        self._state = _PADDING
        return True

    def _begin_unit(self) -> None:
        if self.on_unit is not None:
            self.on_unit()

    def _start_sequential(self) -> bytes:
        self._state = _SEQUENTIAL
        self._sequential = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMORY_LIMIT)
        # liblzma copies the input after a stream's end (`unused_data`): small slices first,
        # so that a tiny stream does not cost a copy of a whole piece.
        self._slice = FIRST_SLICE
        self._drain(0)
        rest = bytes(self._pending)
        self._pending.clear()
        return rest

    def _pass_through(self, decoder: lzma.LZMADecompressor, data: Buffer) -> None:
        """Decompresses `data` with a streaming decoder, handing on at most PIECE at once."""
        try:
            out = decoder.decompress(data, PIECE)
            while True:
                self.emit(out)
                if decoder.eof or decoder.needs_input:
                    return
                out = decoder.decompress(b"", PIECE)
        except lzma.LZMAError as exc:
            raise InvalidImage(f"xz: the compressed stream is corrupt: {exc}") from exc

    def _feed_sequential(self, view: memoryview) -> memoryview:
        decoder = self._sequential
        assert decoder is not None
        consumed = min(len(view), self._slice)
        self._slice = min(self._slice * 4, PIECE)
        self._pass_through(decoder, view[:consumed])
        if not decoder.eof:
            return view[consumed:]
        self._sequential = None
        self.streams += 1
        self._state = _PADDING
        # What followed the stream's end in the slice is still in `view`.
        return view[consumed - len(decoder.unused_data) :]

    def _feed_padding(self, view: memoryview) -> memoryview:
        """Zero bytes between and after streams; anything else starts the next stream."""
        if view[0] != 0:
            self._state = _STREAM_START
            self._pending.clear()
            return view
        head = bytes(view[:PARSE_SLICE])
        zeros = len(head) - len(head.lstrip(b"\x00"))
        if zeros == len(head):
            return view[zeros:]
        self._state = _STREAM_START
        self._pending.clear()
        return view[zeros:]

    # -- decoding -----------------------------------------------------------------------

    def _submit(self, block: _Block) -> None:
        stream, block.stream = block.stream, None
        assert stream is not None
        if self.workers <= 1:
            self._emit_all(_decode_block(stream, block.uncompressed))
            return
        self._drain(MAX_IN_FLIGHT - 1)
        self._in_flight.append(_block_workers().submit(_decode_block, stream, block.uncompressed))
        self.parallel_blocks += 1

    def _drain(self, keep: int) -> None:
        """Hands on the oldest blocks' data until at most `keep` blocks are in flight."""
        while len(self._in_flight) > keep:
            self._emit_all(self._in_flight.popleft().result())

    def _emit_all(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.emit(piece)
