"""Raw images: the stream is the disk."""

from __future__ import annotations

from importer.formats.base import Converter, ImageInfo, Limits, RawTarget


class RawConverter(Converter):
    format = "raw"

    def __init__(self, target: RawTarget, limits: Limits) -> None:
        super().__init__(target, limits)
        self.offset = 0

    def feed(self, data: memoryview) -> None:
        self.target.write(self.offset, data)
        self.offset += len(data)

    def finish(self) -> ImageInfo:
        return ImageInfo(format=self.format, virtual_size=self.offset)
