"""Taking wrappers off a stream as it passes: gzip, xz, zstd, bzip2 and a one-file tar.

Each unwrapper is a push stage: `feed` takes the next piece of the wrapped stream and feeds
what it unwraps onward, in pieces of at most `PIECE` bytes, so no member, frame or file is
ever held whole in memory. Concatenated members/streams/frames are read one after the other
(as `gzip -d`, `xz -d`, `zstd -d` and `bzip2 -d` do); zero bytes after the last one are
padding. Everything unwrapped is counted: a stream that expands past what any image within
the limits can be (a compression bomb) stops with `ImageTooLarge` as soon as it crosses
that line, after bounded work.

Each frame, member, stream or block costs a fixed amount of work on top of its bytes, so a
stream may begin only so many of them for the bytes it moves: `FREE_UNITS`, then one per
`BYTES_PER_UNIT` (8 KiB) of compressed input plus unwrapped output. Compressors begin a
new unit only after 64 KiB of output or more (bgzip: 64 KiB members; zstd and pzstd:
128 KiB blocks, frames of MiBs; pbzip2: 900 kB streams; xz -T0: blocks of 1 MiB and up;
gzip, pigz, bzip2, xz: one member, stream or few blocks), so real images, sparse ones too
(their units are small in but large out), keep 8x or more below the bound; a stream of
tiny units is refused (`InvalidImage`) after bounded work. The input is counted too, so
a unit of incompressible data pays for itself whatever it unwraps to. Small output pieces
are gathered within each `feed`, so tiny units do not cost a call downstream each.
"""

from __future__ import annotations

import bz2
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

import zstandard

from importer.errors import ImageTooLarge, InvalidImage
from importer.formats.base import PIECE, Buffer, Limits, MiB
from importer.formats.tar import DIRECTORY, REGULAR, TarEntry, TarParser
from importer.formats.xz import XzDecoder

# Largest piece of input given to a decompressor at once (which bounds the expansion of one
# call); pieces handed onward are at most PIECE.
INPUT_SLICE: Final = 128 * 1024

# Memory a decoder may need for its window: zstd's default limit is 128 MiB (frames made
# with --long=31 are refused); xz's is in importer.formats.xz.
ZSTD_MAX_WINDOW: Final = 128 * MiB

# Frames, members, streams and blocks a stream may begin before their number must be paid
# for with bytes, and the bytes (compressed in plus unwrapped out) each further one needs.
FREE_UNITS: Final = 1024
BYTES_PER_UNIT: Final = 8 * 1024

# Output pieces smaller than this are gathered (within one feed) before they go on.
GATHER: Final = 256 * 1024
# The first input slice of a new member: its decoder copies what follows its end
# (`unused_data`), so a slice as large as INPUT_SLICE would cost that much per tiny member.
FIRST_SLICE: Final = 4 * 1024


class Stage(Protocol):
    """A consumer of a byte stream: the next unwrapper, a sniffer or a converter."""

    def feed(self, data: memoryview) -> None: ...

    def finish(self) -> None: ...

    def settle(self) -> None:
        """Completes the work still in flight on other threads, so that everything fed so
        far has reached the target (before a snapshot; between two feeds)."""
        ...

    def close(self) -> None: ...


def max_unwrapped_size(limits: Limits) -> int:
    """The most an image within the limits can take as a file: the virtual size plus room
    for metadata (qcow2 tables, VMDK grain tables, ...) and for internal snapshots."""
    return limits.max_virtual_size + limits.max_virtual_size // 8 + 64 * MiB


def _is_zero(data: Buffer) -> bool:
    raw = bytes(data)
    return raw.count(0) == len(raw)


class _Unwrapper:
    name: str
    units_are: str  # what a unit of the format is, for messages

    def __init__(self, downstream: Stage, limits: Limits) -> None:
        self.downstream = downstream
        self.limit = max_unwrapped_size(limits)
        self.consumed = 0
        self.produced = 0
        self.units = 0
        self._gathered = bytearray()

    def _emit(self, out: Buffer) -> None:
        if not out:
            return
        self.produced += len(out)
        if self.produced > self.limit:
            raise ImageTooLarge(
                f"{self.name}: the stream expands to more than {self.limit} bytes, more than "
                "any image within the size limit can take"
            )
        if len(out) >= GATHER:
            self._pass_gathered()
            self.downstream.feed(memoryview(out))
            return
        self._gathered += out
        if len(self._gathered) >= GATHER:
            self._pass_gathered()

    def _pass_gathered(self) -> None:
        """Hands on what was gathered (at the end of each feed: nothing stays between
        feeds)."""
        if self._gathered:
            gathered, self._gathered = self._gathered, bytearray()
            self.downstream.feed(memoryview(gathered))

    def _begin_unit(self) -> None:
        """A frame, member, stream or block begins: refused if the stream has begun more
        of them than its bytes pay for (see the module's doc)."""
        self.units += 1
        allowed = FREE_UNITS + (self.consumed + self.produced) // BYTES_PER_UNIT
        if self.units > allowed:
            raise InvalidImage(
                f"{self.name}: {self.units} {self.units_are} in the first {self.consumed} "
                f"compressed bytes, which unwrap to {self.produced} bytes: no compressor "
                f"makes units that small (at most {FREE_UNITS}, then one per "
                f"{BYTES_PER_UNIT // 1024} KiB in and out, are taken)"
            )

    def settle(self) -> None:
        self._pass_gathered()
        self.downstream.settle()

    def close(self) -> None:
        self.downstream.close()


class _MemberDecompressor(_Unwrapper):
    """gzip and bzip2: a sequence of independent members, each with its own end, then
    optional zero padding."""

    units_are = "members"

    def __init__(self, downstream: Stage, limits: Limits) -> None:
        super().__init__(downstream, limits)
        self._decoder: Any = None
        self._members = 0
        self._padding = False
        self._slice = FIRST_SLICE

    def _new_decoder(self) -> Any:
        raise NotImplementedError

    def _run(self, decoder: Any, data: memoryview) -> int:
        """Decompresses `data`; returns how many bytes at its end follow the member's end
        (-1 while the member goes on)."""
        raise NotImplementedError

    def _decompress(self, decoder: Any, data: Buffer) -> bytes:
        try:
            out: bytes = decoder.decompress(data, PIECE)
        except (zlib.error, OSError, EOFError) as exc:
            raise InvalidImage(f"{self.name}: the compressed stream is corrupt: {exc}") from exc
        return out

    def feed(self, data: memoryview) -> None:
        self.consumed += len(data)
        pos = 0
        n = len(data)
        while pos < n:
            if self._padding:
                if not _is_zero(data[pos:]):
                    raise InvalidImage(
                        f"{self.name}: unexpected data after the end of the compressed stream"
                    )
                break
            if self._decoder is None:
                if self._members and data[pos] == 0:
                    self._padding = True
                    continue
                self._begin_unit()
                self._decoder = self._new_decoder()
                self._slice = FIRST_SLICE
            end = min(n, pos + self._slice)
            self._slice = min(self._slice * 4, INPUT_SLICE)
            left = self._run(self._decoder, data[pos:end])
            if left >= 0:
                self._decoder = None
                self._members += 1
                end -= left
            pos = end
        self._pass_gathered()

    def finish(self) -> None:
        if self._decoder is not None or not self._members:
            raise InvalidImage(f"{self.name}: the compressed stream is truncated")
        self.downstream.finish()


class GzipReader(_MemberDecompressor):
    name = "gzip"
    units_are = "members"

    def _new_decoder(self) -> Any:
        return zlib.decompressobj(wbits=31)

    def _run(self, decoder: Any, data: memoryview) -> int:
        # zlib hands back the input it did not consume; feeding it again drains the
        # output a piece at a time.
        pending: Buffer = data
        while True:
            out = self._decompress(decoder, pending)
            self._emit(out)
            if decoder.eof:
                return len(decoder.unused_data)
            pending = decoder.unconsumed_tail
            if not pending and len(out) < PIECE:
                return -1


class _BufferingReader(_MemberDecompressor):
    """Decoders that keep unconsumed input themselves (`needs_input`): bzip2."""

    def _run(self, decoder: Any, data: memoryview) -> int:
        out = self._decompress(decoder, data)
        while True:
            self._emit(out)
            if decoder.eof:
                return len(decoder.unused_data)
            if decoder.needs_input:
                return -1
            out = self._decompress(decoder, b"")


class XzReader(_Unwrapper):
    """xz streams; multi-block streams are decompressed on several threads (see
    importer.formats.xz)."""

    name = "xz"
    units_are = "streams and blocks"

    def __init__(self, downstream: Stage, limits: Limits) -> None:
        super().__init__(downstream, limits)
        self._xz = XzDecoder(self._emit, on_unit=self._begin_unit)

    def feed(self, data: memoryview) -> None:
        self.consumed += len(data)
        self._xz.feed(data)
        self._pass_gathered()

    def finish(self) -> None:
        self._xz.finish()
        self._pass_gathered()
        self.downstream.finish()

    def settle(self) -> None:
        self._xz.settle()
        super().settle()

    def close(self) -> None:
        self._xz.close()
        super().close()


class Bzip2Reader(_BufferingReader):
    name = "bzip2"
    units_are = "streams"

    def _new_decoder(self) -> Any:
        return bz2.BZ2Decompressor()


# -- zstd ---------------------------------------------------------------------------------

ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
ZSTD_MAX_BLOCK: Final = 128 * 1024
# Blocks handed to the decoder per call: each yields at most ZSTD_MAX_BLOCK bytes.
ZSTD_BLOCKS_PER_CALL: Final = 8

_MAGIC, _FRAME_HEADER, _BLOCK_HEADER, _BLOCK_BODY, _CHECKSUM, _SKIP_SIZE, _SKIP, _PADDING = range(8)


class ZstdFrames:
    """Follows the frame and block structure of a zstd stream (RFC 8878) without decoding
    it, and cuts the stream into pieces of a few blocks each. A zstd block decodes to at
    most 128 KiB, so handing the decoder one piece at a time bounds what one call can
    produce, however much the data expands. Skippable frames are left out."""

    def __init__(self, on_unit: Callable[[], None] = lambda: None) -> None:
        """`on_unit()` hears of each frame (skippable ones too) and block that begins."""
        self.on_unit = on_unit
        self.state = _MAGIC
        self.header = bytearray()
        self.need = 4
        self.remaining = 0
        self.frames = 0
        self.last_block = False
        self.has_checksum = False

    @property
    def between_frames(self) -> bool:
        return (self.state == _MAGIC and not self.header) or self.state == _PADDING

    def split(self, view: memoryview) -> Iterator[tuple[Buffer, bool]]:
        """Yields (bytes of a frame, whether the frame ends with them)."""
        pos = 0
        n = len(view)
        # Start in `view` of frame bytes not yet yielded; -1 outside a frame.
        run = 0 if self.state in (_FRAME_HEADER, _BLOCK_HEADER, _BLOCK_BODY, _CHECKSUM) else -1
        blocks = 0
        while pos < n:
            state = self.state
            if state in (_BLOCK_BODY, _CHECKSUM, _SKIP):
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining:
                    continue
                if state == _SKIP:
                    self.state, self.need = _MAGIC, 4
                elif self._frame_ends(state):
                    yield view[run:pos], True
                    run = -1
                    blocks = 0
                continue
            if state == _PADDING:
                if not _is_zero(view[pos:]):
                    raise InvalidImage("zstd: unexpected data after the last frame")
                return
            if state == _MAGIC and not self.header and self.frames and view[pos] == 0:
                self.state = _PADDING
                continue
            if state == _BLOCK_HEADER and not self.header and blocks >= ZSTD_BLOCKS_PER_CALL:
                if pos > run:
                    yield view[run:pos], False
                run = pos
                blocks = 0
            take = min(self.need - len(self.header), n - pos)
            self.header += view[pos : pos + take]
            pos += take
            if len(self.header) < self.need:
                continue
            header = bytes(self.header)
            self.header.clear()
            if state == _MAGIC:
                self.on_unit()
                if header == ZSTD_MAGIC:
                    yield header, False
                    run = pos
                    self.state, self.need = _FRAME_HEADER, 1
                elif header[1:] == b"\x2a\x4d\x18" and header[0] & 0xF0 == 0x50:
                    self.state, self.need = _SKIP_SIZE, 4
                else:
                    raise InvalidImage(
                        f"zstd: frame {self.frames + 1} does not start with the zstd magic"
                    )
            elif state == _SKIP_SIZE:
                self.state, self.remaining = _SKIP, struct.unpack("<I", header)[0]
                if not self.remaining:
                    self.state, self.need = _MAGIC, 4
            elif state == _FRAME_HEADER and self.need == 1:
                # The descriptor byte says how long the rest of the header is.
                self.need = 1 + _frame_header_rest(header[0])
                self.header += header
            elif state == _FRAME_HEADER:
                self.has_checksum = bool(header[0] & 0x04)
                self.state, self.need = _BLOCK_HEADER, 3
            else:
                value = int.from_bytes(header, "little")
                self.last_block = bool(value & 1)
                block_type = (value >> 1) & 3
                block_size = value >> 3
                if block_type == 3 or block_size > ZSTD_MAX_BLOCK:
                    raise InvalidImage(f"zstd: invalid block in frame {self.frames + 1}")
                self.on_unit()
                blocks += 1
                self.state = _BLOCK_BODY
                self.remaining = 1 if block_type == 1 else block_size
                if not self.remaining and self._frame_ends(_BLOCK_BODY):
                    yield view[run:pos], True
                    run = -1
                    blocks = 0
        if run >= 0 and pos > run:
            yield view[run:pos], False

    def _frame_ends(self, done: int) -> bool:
        """Moves on after a block body or the checksum is complete; True at a frame's end."""
        if done == _BLOCK_BODY and not self.last_block:
            self.state, self.need = _BLOCK_HEADER, 3
            return False
        if done == _BLOCK_BODY and self.has_checksum:
            self.state, self.remaining = _CHECKSUM, 4
            return False
        self.frames += 1
        self.state, self.need = _MAGIC, 4
        return True


def _frame_header_rest(descriptor: int) -> int:
    """Bytes of the frame header after its descriptor byte."""
    if descriptor & 0x08:
        raise InvalidImage("zstd: a frame header has its reserved bit set")
    single_segment = descriptor & 0x20
    fcs_flag = descriptor >> 6
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    did_size = (0, 1, 2, 4)[descriptor & 3]
    return (0 if single_segment else 1) + did_size + fcs_size


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)


class ZstdReader(_Unwrapper):
    name = "zstd"
    units_are = "frames and blocks"

    def __init__(self, downstream: Stage, limits: Limits) -> None:
        super().__init__(downstream, limits)
        self._context = _zstd_decompressor()
        self._frames = ZstdFrames(self._begin_unit)
        self._decoder: zstandard.ZstdDecompressionObj | None = None

    def feed(self, data: memoryview) -> None:
        self.consumed += len(data)
        self._feed(data)
        self._pass_gathered()

    def _feed(self, data: memoryview) -> None:
        for piece, frame_ends in self._frames.split(data):
            if self._decoder is None:
                self._decoder = self._context.decompressobj()
            try:
                out = self._decoder.decompress(piece)
            except zstandard.ZstdError as exc:
                raise InvalidImage(f"zstd: the compressed stream is corrupt: {exc}") from exc
            self._emit(out)
            if frame_ends:
                if not self._decoder.eof:
                    raise InvalidImage("zstd: a frame ends before its last block")
                self._decoder = None

    def finish(self) -> None:
        if not self._frames.between_frames or not self._frames.frames:
            raise InvalidImage("zstd: the compressed stream is truncated")
        self.downstream.finish()


def zstd_decompress_exactly(data: Buffer, size: int) -> bytes | None:
    """The first `size` bytes a zstd frame at the start of `data` decodes to, decoding no
    further than needed; None if the frame ends before, or is cut off before, `size`."""
    frames = ZstdFrames()
    decoder = _zstd_decompressor().decompressobj()
    out = bytearray()
    try:
        for piece, frame_ends in frames.split(memoryview(data)):
            out += decoder.decompress(piece)
            if len(out) >= size:
                return bytes(out[:size])
            if frame_ends:
                break
    except (zstandard.ZstdError, InvalidImage):
        return None
    return None


# -- tar ----------------------------------------------------------------------------------

_TAR_KINDS: Final = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"6": "FIFO",
    b"S": "GNU sparse file",
    b"V": "volume label",
    b"M": "multi-volume continuation",
}


class TarReader(TarParser):
    """A tar archive holding one disk image (and perhaps directories): the file's content
    is passed on as it arrives. Links, devices, sparse files and a second file are refused:
    the archive must say unambiguously which bytes are the disk."""

    name = "tar"

    def __init__(self, downstream: Stage, limits: Limits) -> None:
        super().__init__(self.name)
        self.downstream = downstream
        self.limit = max_unwrapped_size(limits)
        self.file_name: str | None = None

    def on_entry(self, entry: TarEntry) -> bool:
        name = entry.name
        if entry.sparse:
            raise InvalidImage(f"tar: {name!r} is a sparse file, which is not supported")
        if entry.type == DIRECTORY:
            return False
        if entry.type not in REGULAR:
            what = _TAR_KINDS.get(entry.type, f"entry of type {entry.type!r}")
            raise InvalidImage(
                f"tar: {name!r} is a {what}; the archive may hold only one regular file "
                "(and directories)"
            )
        if self.file_name is not None:
            raise InvalidImage(
                f"tar: the archive holds more than one file ({self.file_name!r}, "
                f"{name!r}); it must hold exactly one disk image"
            )
        self.file_name = name
        if entry.size > self.limit:
            raise ImageTooLarge(
                f"tar: {name!r} is {entry.size} bytes, more than any image within the size "
                "limit can take"
            )
        return True

    def on_data(self, piece: memoryview) -> None:
        self.downstream.feed(piece)

    def finish(self) -> None:
        self.end()
        if self.file_name is None:
            raise InvalidImage("tar: the archive holds no file")
        self.downstream.finish()

    def settle(self) -> None:
        self.downstream.settle()

    def close(self) -> None:
        self.downstream.close()


UNWRAPPERS: Final[dict[str, Callable[[Stage, Limits], Stage]]] = {
    "gzip": GzipReader,
    "xz": XzReader,
    "zstd": ZstdReader,
    "bzip2": Bzip2Reader,
    "tar": TarReader,
}


def unwrapper(kind: str, downstream: Stage, limits: Limits) -> Stage:
    return UNWRAPPERS[kind](downstream, limits)
