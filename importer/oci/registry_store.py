"""DVCR in a container registry: the same image as the OCI layout, pushed over the API.

The layer streams into one blob upload session while it is received; the config, the
manifest and the tag follow only after the layer is complete and checked. A failed or
refused transfer cancels the session, so no tag and no partial blob remain.
"""

from __future__ import annotations

import asyncio

from importer.oci.image import CONFIG_TYPE, MANIFEST_TYPE, Descriptor, manifest_blob
from importer.oci.registry import RegistryClient
from importer.oci.upload import BlobUpload


class RegistryLayerUpload:
    """A layer blob upload fed from a lane thread: each write waits until the registry
    connection has taken it, which carries the registry's backpressure to the pipeline."""

    # Pieces are gathered to this size before they cross to the event loop: fewer hops.
    BATCH = 4 << 20

    def __init__(self, upload: BlobUpload, loop: asyncio.AbstractEventLoop) -> None:
        self.upload = upload
        self.loop = loop
        self._pending = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        # Copied: the pipeline reuses its buffer once this returns, the socket may not have.
        self._pending += data
        if len(self._pending) >= self.BATCH:
            batch = bytes(self._pending)
            self._pending.clear()
            asyncio.run_coroutine_threadsafe(self.upload.write(batch), self.loop).result()

    async def flush(self) -> None:
        """Sends what is still gathered (after the lane's last write)."""
        if self._pending:
            batch = bytes(self._pending)
            self._pending.clear()
            await self.upload.write(batch)

    async def cancel(self) -> None:
        await self.upload.cancel()


class RegistryStore:
    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.host = client.base_url.split("://", 1)[-1].rstrip("/")

    def reference(self, repo: str, tag: str) -> str:
        return f"{self.host}/{repo}:{tag}"

    async def begin_layer(self, repo: str) -> RegistryLayerUpload:
        upload = await self.client.start_blob_upload(repo)
        return RegistryLayerUpload(upload, asyncio.get_running_loop())

    async def publish(
        self,
        repo: str,
        tag: str,
        layer: RegistryLayerUpload,
        layer_desc: Descriptor,
        config: bytes,
    ) -> str:
        await layer.flush()
        await layer.upload.finish(layer_desc.digest)
        config_digest = await self.client.push_blob(repo, config)
        manifest = manifest_blob(Descriptor(CONFIG_TYPE, config_digest, len(config)), layer_desc)
        return await self.client.put_manifest(repo, tag, manifest, MANIFEST_TYPE)

    async def remove(self, repo: str, tag: str) -> None:
        await self.client.delete_manifest(repo, tag)

    async def close(self) -> None:
        await self.client.close()
