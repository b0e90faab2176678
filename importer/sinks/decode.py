"""The lane that turns the received stream into raw disk content on a target."""

from __future__ import annotations

from typing import Any

from importer.formats.base import Converter, ImageInfo, Limits, RawTarget
from importer.formats.decoder import ImageDecoder
from importer.formats.snapshot import restore_decoder, snapshot_decoder, state_metadata


class DecodeLane:
    """Feeds the received bytes to a decoder in the lane's thread."""

    name = "decode"

    def __init__(self, decoder: Converter, offset: int = 0) -> None:
        self.decoder = decoder
        self.info: ImageInfo | None = None
        self.offset = offset  # bytes of the stream fed to the decoder so far

    def update(self, data: memoryview) -> None:
        self.decoder.feed(data)
        self.offset += memoryview(data).nbytes

    def finish(self) -> None:
        self.info = self.decoder.finish()

    def close(self) -> None:
        self.decoder.close()

    def settle(self) -> None:
        """Completes the decoding in flight on other threads (only while no `update`
        runs): what was fed so far is then on the target."""
        if isinstance(self.decoder, ImageDecoder) and self.info is None:
            self.decoder.settle()

    def image_info(self) -> ImageInfo:
        if self.info is None:
            raise RuntimeError("the image is not complete yet")
        return self.info

    def snapshot(self, extra: dict[str, Any] | None = None) -> bytes | None:
        """The decoder's state and the offset it stands at (see importer.formats.snapshot);
        None when it cannot be saved. Only while no `update` runs, after `settle()`."""
        if not isinstance(self.decoder, ImageDecoder) or self.info is not None:
            return None
        return snapshot_decoder(self.decoder, {**(extra or {}), "offset": self.offset})

    @classmethod
    def resume(cls, state: bytes, target: RawTarget, limits: Limits) -> DecodeLane:
        """The lane of a `snapshot`, writing to `target`; raises ValueError if the state
        cannot be used."""
        offset = state_metadata(state)["extra"].get("offset")
        if not isinstance(offset, int):
            raise ValueError("the decoder state has no stream offset")
        return cls(restore_decoder(state, target, limits), offset)
