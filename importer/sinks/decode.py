"""The lane that turns the received stream into raw disk content on a target."""

from __future__ import annotations

from importer.formats.base import Converter, ImageInfo


class DecodeLane:
    """Feeds the received bytes to a decoder in the lane's thread."""

    name = "decode"

    def __init__(self, decoder: Converter) -> None:
        self.decoder = decoder
        self.info: ImageInfo | None = None

    def update(self, data: memoryview) -> None:
        self.decoder.feed(data)

    def finish(self) -> None:
        self.info = self.decoder.finish()

    def close(self) -> None:
        self.decoder.close()

    def image_info(self) -> ImageInfo:
        if self.info is None:
            raise RuntimeError("the image is not complete yet")
        return self.info
