"""ISO 9660 and UDF images (installer and data CDs/DVDs): stored as they are, as a cdrom."""

from __future__ import annotations

import struct
from typing import Final

from importer.errors import ImageTooLarge, InvalidImage
from importer.formats.base import Converter, ImageInfo, Limits, RawTarget

SECTOR: Final = 2048
# ISO 9660 volume descriptors: sector 16 onwards, up to the set terminator.
DESCRIPTORS_START: Final = 16 * SECTOR
DESCRIPTORS_END: Final = 32 * SECTOR
PRIMARY_VOLUME: Final = 1


class IsoConverter(Converter):
    format = "iso"

    def __init__(self, target: RawTarget, limits: Limits) -> None:
        super().__init__(target, limits)
        self.offset = 0
        self.descriptors = bytearray()

    def feed(self, data: memoryview) -> None:
        end = self.offset + len(data)
        if end > self.limits.max_virtual_size:
            raise ImageTooLarge(
                f"iso: the image is larger than the limit of {self.limits.max_virtual_size} bytes"
            )
        if self.offset < DESCRIPTORS_END and end > DESCRIPTORS_START:
            lo = max(self.offset, DESCRIPTORS_START)
            hi = min(end, DESCRIPTORS_END)
            self.descriptors += data[lo - self.offset : hi - self.offset]
        self.target.write(self.offset, data)
        self.offset = end

    def finish(self) -> ImageInfo:
        volume_size = self._volume_size()
        if volume_size is not None and volume_size > self.offset:
            raise InvalidImage(
                f"iso: the image is truncated: its primary volume descriptor says "
                f"{volume_size} bytes, but only {self.offset} arrived"
            )
        return ImageInfo(format=self.format, virtual_size=self.offset, cdrom=True)

    def _volume_size(self) -> int | None:
        """Bytes the ISO 9660 primary volume descriptor claims; None for UDF-only media."""
        for pos in range(0, len(self.descriptors) - SECTOR + 1, SECTOR):
            descriptor = self.descriptors[pos : pos + SECTOR]
            if descriptor[1:6] != b"CD001":
                return None
            if descriptor[0] == PRIMARY_VOLUME:
                blocks: int = struct.unpack_from("<I", descriptor, 80)[0]
                block_size: int = struct.unpack_from("<H", descriptor, 128)[0]
                return blocks * block_size
        return None
