"""ContainerRegistry storage: the bytes as received, as one tar layer of an OCI image.

The layer streams to the store while the decode lane validates the image on the way; the
config, manifest and tag are written only after everything is in and checked, so a reader
never sees a partial image, and a refused stream leaves no tag behind.
"""

from __future__ import annotations

import asyncio

from importer.formats.base import Converter, ImageInfo
from importer.lane import Lane
from importer.oci.image import LAYER_TYPE, Descriptor, config_blob, image_labels
from importer.oci.layer import LayerLane
from importer.oci.store import ImageStore, LayerUpload
from importer.pipeline import TransferResult
from importer.sinks.decode import DecodeLane


class DvcrSink:
    def __init__(
        self,
        store: ImageStore,
        upload: LayerUpload,
        repo: str,
        tag: str,
        layer: LayerLane,
        decoder: Converter,
    ) -> None:
        self.store = store
        self.upload = upload
        self.repo = repo
        self.tag = tag
        self.layer = layer
        self.decode = DecodeLane(decoder)

    @classmethod
    async def open(
        cls,
        store: ImageStore,
        repo: str,
        tag: str,
        filename: str,
        size: int,
        decoder: Converter,
    ) -> DvcrSink:
        upload = await store.begin_layer(repo)
        return cls(store, upload, repo, tag, LayerLane(upload, filename, size), decoder)

    def lanes(self) -> list[Lane]:
        return [self.layer, self.decode]

    def image_info(self) -> ImageInfo:
        return self.decode.image_info()

    async def commit(self, result: TransferResult) -> None:
        info = result.image
        labels = image_labels(
            result.received_bytes, info.virtual_size, info.format, result.checksums
        )
        layer = Descriptor(LAYER_TYPE, self.layer.digest, self.layer.length)
        await self.store.publish(
            self.repo, self.tag, self.upload, layer, config_blob(layer.digest, labels)
        )
        result.stored_bytes = self.layer.length
        result.written_bytes = self.layer.length

    async def abort(self) -> None:
        await asyncio.to_thread(self.decode.close)
        await self.upload.cancel()
