"""The decoder the pipeline drives: unwrap, sniff, convert, in one pass.

`ImageDecoder` takes the received bytes in order. Each layer of the stream starts with a
probe that keeps just the head (at most `SNIFF_SIZE` bytes) until `sniff` can name it; a
wrapper gets its unwrapper, whose output goes to a fresh probe; a format gets its
converter. The head is then replayed into what was chosen, followed by everything after
it, so nothing is read twice and nothing beyond the head is held.

A stream that is none of the formats is raw; its last 512 bytes are held back until the
end, because a fixed VHD is a raw disk plus a 512-byte footer, visible only there.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from importer.directio import ALIGNMENT
from importer.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from importer.formats.base import Converter, ImageInfo, Limits, RawTarget
from importer.formats.iso import IsoConverter
from importer.formats.qcow2 import Qcow2Converter
from importer.formats.sniff import FORMATS, SNIFF_SIZE, WRAPPERS, sniff
from importer.formats.unwrap import Stage, unwrapper
from importer.formats.vdi import VdiConverter
from importer.formats.vhd import VhdConverter, fixed_vhd_size
from importer.formats.vhdx import VhdxConverter
from importer.formats.vmdk import VmdkConverter

# gzip inside tar inside xz is plausible; deeper nesting is not an image anyone ships.
MAX_WRAPPERS: Final = 4
FOOTER_SIZE: Final = 512
_HELD_BACK: Final = ALIGNMENT  # at least FOOTER_SIZE

# The converter of each format.
CONVERTERS: Final[dict[str, type[Converter]]] = {
    "qcow2": Qcow2Converter,
    "vmdk": VmdkConverter,
    "vdi": VdiConverter,
    "vhd": VhdConverter,
    "vhdx": VhdxConverter,
    "iso": IsoConverter,
}


class ImageDecoder(Converter):
    """Any supported image, wrapped or not, to raw writes on a target.

    `declared_format` is what the user said the image is: "raw" means the bytes are the
    disk as they are (never unwrapped or probed, so a guest disk that happens to start
    with a qcow2 header stays a raw disk); another format must match what is found.
    """

    format = "auto"

    def __init__(
        self, target: RawTarget, limits: Limits, declared_format: str | None = None
    ) -> None:
        super().__init__(target, limits)
        if declared_format is not None and declared_format not in FORMATS:
            raise UnsupportedFormat(f"unknown image format {declared_format!r}")
        self.declared_format = declared_format
        self.wrappers: list[str] = []  # outermost first, as found
        self.detected: str | None = None  # the format inside, once sniffed
        self.info: ImageInfo | None = None
        self._entry: Stage
        if declared_format == "raw":
            self.detected = "raw"
            self._entry = _RawStage(self, probe_footer=False)
        else:
            self._entry = _Probe(self, depth=0)

    def feed(self, data: memoryview) -> None:
        try:
            self._entry.feed(memoryview(data).cast("B"))
        except BaseException:
            self.close()
            raise

    def finish(self) -> ImageInfo:
        try:
            self._entry.finish()
            info = self.info
            if info is None:
                raise InvalidImage("the stream ended before the image was complete")
            declared = self.declared_format
            if declared is not None and info.format != declared:
                raise InvalidImage(f"the image was declared {declared} but is {info.format}")
            return dataclasses.replace(info, wrappers=tuple(self.wrappers))
        finally:
            self.close()

    def settle(self) -> None:
        """Completes the decoding still in flight on other threads (xz blocks), so that
        everything fed so far has reached the target; between two feeds."""
        self._entry.settle()

    def close(self) -> None:
        """Release what the stages hold (spill files); safe to call more than once."""
        self._entry.close()

    # -- called by the stages ------------------------------------------------------------

    def stage_for(self, kind: str, depth: int) -> Stage:
        if kind in WRAPPERS:
            if depth >= MAX_WRAPPERS:
                raise InvalidImage(
                    f"the image is wrapped more than {MAX_WRAPPERS} times "
                    f"({' > '.join([*self.wrappers, kind])})"
                )
            self.wrappers.append(kind)
            return unwrapper(kind, _Probe(self, depth + 1), self.limits)
        declared = self.declared_format
        if declared is not None and kind not in (declared, "raw"):
            raise InvalidImage(f"the image was declared {declared} but is {kind}")
        self.detected = kind
        if kind == "raw":
            return _RawStage(self, probe_footer=True)
        return _ConverterStage(self, CONVERTERS[kind](self.target, self.limits))


class _Probe:
    """Holds the head of one layer of the stream until `sniff` names it."""

    def __init__(self, decoder: ImageDecoder, depth: int) -> None:
        self.decoder = decoder
        self.depth = depth
        self.head = bytearray()
        self.next: Stage | None = None

    def feed(self, data: memoryview) -> None:
        if self.next is not None:
            self.next.feed(data)
            return
        need = SNIFF_SIZE - len(self.head)
        self.head += data[:need]
        kind = sniff(self.head, final=False)
        if kind is not None:
            stage = self._start(kind)
            if len(data) > need:
                stage.feed(data[need:])

    def finish(self) -> None:
        if self.next is None:
            self._start(sniff(self.head, final=True) or "raw")
        assert self.next is not None
        self.next.finish()

    def settle(self) -> None:
        if self.next is not None:
            self.next.settle()

    def close(self) -> None:
        if self.next is not None:
            self.next.close()

    def _start(self, kind: str) -> Stage:
        stage = self.next = self.decoder.stage_for(kind, self.depth)
        head, self.head = self.head, bytearray()
        if head:
            stage.feed(memoryview(head))
        return stage


class _ConverterStage:
    def __init__(self, decoder: ImageDecoder, converter: Converter) -> None:
        self.decoder = decoder
        self.converter = converter

    def feed(self, data: memoryview) -> None:
        self.converter.feed(data)

    def finish(self) -> None:
        self.decoder.info = self.converter.finish()

    def settle(self) -> None:
        pass  # converters work in the caller's thread

    def close(self) -> None:
        close = getattr(self.converter, "close", None)
        if close is not None:
            close()


class _RawStage:
    """The stream is the disk. With `probe_footer`, the last 512 bytes are held back: a
    fixed VHD footer there makes the image a vhd whose disk is everything before it. A whole
    ALIGNMENT is held back rather than the 512 bytes, so that the rest of each block keeps
    its alignment and can be written directly (importer.directio)."""

    def __init__(self, decoder: ImageDecoder, probe_footer: bool) -> None:
        self.decoder = decoder
        self.target = decoder.target
        self.max_size = decoder.limits.max_virtual_size
        self.probe_footer = probe_footer
        self.offset = 0
        self.tail = bytearray()

    def feed(self, data: memoryview) -> None:
        if not self.probe_footer:
            self._write(data)
            return
        if len(data) >= _HELD_BACK:
            if self.tail:
                self._write(memoryview(self.tail))
            self._write(data[:-_HELD_BACK])
            self.tail = bytearray(data[-_HELD_BACK:])
            return
        self.tail += data
        excess = len(self.tail) - _HELD_BACK
        if excess > 0:
            self._write(memoryview(self.tail)[:excess])
            del self.tail[:excess]

    def _write(self, data: memoryview) -> None:
        if not len(data):
            return
        end = self.offset + len(data)
        if end > self.max_size:
            raise ImageTooLarge(f"raw: the image is larger than the limit of {self.max_size} bytes")
        self.target.write(self.offset, data)
        self.offset = end

    def finish(self) -> None:
        held = bytes(self.tail)
        self.tail = bytearray()
        body, footer = held[:-FOOTER_SIZE], held[-FOOTER_SIZE:]
        if len(footer) == FOOTER_SIZE:
            if _is_dmg_trailer(footer):
                raise UnsupportedFormat("Apple disk images (DMG) are not supported")
            size = fixed_vhd_size(footer)
            if size is not None:
                self._write(memoryview(body))
                if size > self.offset:
                    raise InvalidImage(
                        f"vhd: the fixed disk is truncated: its footer says {size} bytes, "
                        f"but only {self.offset} bytes precede it"
                    )
                self.decoder.detected = "vhd"
                self.decoder.info = ImageInfo(format="vhd", virtual_size=size)
                return
        self._write(memoryview(held))
        self.decoder.info = ImageInfo(format="raw", virtual_size=self.offset)

    def settle(self) -> None:
        pass  # writes happen in the caller's thread

    def close(self) -> None:
        self.tail = bytearray()


def _is_dmg_trailer(tail: bytes) -> bool:
    """The UDIF `koly` block that ends a DMG: magic, version 4, header size 512."""
    return tail[:12] == b"koly\x00\x00\x00\x04\x00\x00\x02\x00"
