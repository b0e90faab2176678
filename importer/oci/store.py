"""What a DVCR is to its writers and readers: a store of images, whichever kind it is.

The embedded OCI layout (importer/oci/layout.py) and a registry (importer/oci/registry_store.py)
both are one; ContainerRegistry storage (importer/sinks/dvcr.py) writes through it.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from importer.oci.disklayer import DiskFile
from importer.oci.image import Descriptor


class LayerUpload(Protocol):
    """A layer blob being written: `write` from a lane thread; the rest on the loop."""

    def write(self, data: bytes | memoryview) -> None: ...

    async def cancel(self) -> None: ...


class ImageStore(Protocol):
    """A DVCR: the embedded OCI layout or a registry."""

    async def begin_layer(self, repo: str) -> LayerUpload: ...

    async def publish(
        self, repo: str, tag: str, layer: LayerUpload, layer_desc: Descriptor, config: bytes
    ) -> str:
        """Makes the image visible under `repo:tag`; `layer` is one this store began."""
        ...

    async def remove(self, repo: str, tag: str) -> None: ...

    def reference(self, repo: str, tag: str) -> str: ...

    async def copy(self, src_repo: str, src_tag: str, dst_repo: str, dst_tag: str) -> None:
        """`dst_repo:dst_tag` becomes the same image, sharing its blobs (no bytes copied
        where the store can avoid it). A missing source raises SourceUnreachable."""
        ...

    def open_disk(self, repo: str, tag: str) -> AbstractAsyncContextManager[DiskFile]:
        """The disk file of the image, streamed (see importer/oci/disklayer.py)."""
        ...
