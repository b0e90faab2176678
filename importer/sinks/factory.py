"""The sink of one transfer, wired the same way for the server and the importer job.

PersistentVolumeClaim storage gets a PvcSink (importer/sinks/pvc.py): the image decoded to
raw on the claim, through a slowed target when `DVCR_FAULT_SINK_BYTES_PER_SEC` is set
(importer/sinks/throttle.py); a transfer that continues from a checkpoint gets its sink
back from the saved state. ContainerRegistry storage gets a DvcrSink
(importer/sinks/dvcr.py): the bytes as received in one layer, checked on the way by a
decoder that stores nothing.

The callers say only what differs: which claim (and whether it is a block claim), or which
store, repository and tag.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from importer.formats.base import Limits, NullTarget
from importer.formats.decoder import ImageDecoder
from importer.oci.layer import safe_filename
from importer.oci.store import ImageStore
from importer.sinks.dvcr import DvcrSink
from importer.sinks.pvc import BlockClaimTarget, ClaimTarget, FileClaimTarget, PvcSink
from importer.sinks.throttle import throttled_from_env


@dataclass(frozen=True)
class ClaimLocation:
    """A PersistentVolumeClaim: a filesystem claim's directory (the image becomes its
    `disk.img`), or a block claim's device or pre-sized file, written in place."""

    path: Path
    block: bool


@dataclass(frozen=True)
class DvcrLocation:
    """An image in a DVCR: the store, and the repository and tag the image gets."""

    store: ImageStore
    repo: str
    tag: str


class SinkFactory:
    """Opens sinks that keep `limits` (a filesystem claim's capacity is its virtual size)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def claim_sink(self, claim: ClaimLocation) -> PvcSink:
        target: ClaimTarget
        if claim.block:
            target = BlockClaimTarget(claim.path)
        else:
            target = FileClaimTarget(claim.path, capacity=self.limits.max_virtual_size)
        return PvcSink(target, ImageDecoder(throttled_from_env(target), self.limits))

    async def resumed_claim_sink(self, state: bytes, location: Path) -> PvcSink:
        """The sink of a PvcSink snapshot, on the claim it was taken on (its directory, or
        a block claim's path). Raises what PvcSink.resume raises when the state cannot be
        used."""
        return await asyncio.to_thread(PvcSink.resume, state, location, self.limits)

    async def dvcr_sink(
        self, image: DvcrLocation, length: int, filename: str | None = None
    ) -> DvcrSink:
        """The layer needs the image's `length` before its data (a tar header)."""
        validator = ImageDecoder(NullTarget(self.limits.max_virtual_size), self.limits)
        return await DvcrSink.open(
            image.store, image.repo, image.tag, safe_filename(filename), length, validator
        )
