"""DVCR in a container registry: the same image as the OCI layout, pushed over the API.

The layer streams into one blob upload session while it is received; the config, the
manifest and the tag follow only after the layer is complete and checked. A failed or
refused transfer cancels the session, so no tag and no partial blob remain.

A copy mounts the blobs into the new repository (the registry links them, nothing is sent)
and puts the same manifest under the new tag; only when the registry refuses a mount is
that blob streamed across. `open_disk` streams the disk file back out of the layer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from importer.errors import InvalidImage, SourceUnreachable
from importer.oci.disklayer import DiskFile
from importer.oci.errors import RegistryError
from importer.oci.image import CONFIG_TYPE, MANIFEST_TYPE, Descriptor, manifest_blob
from importer.oci.pull import open_registry_disk
from importer.oci.registry import DOCKER_MANIFEST_LIST, OCI_INDEX, RegistryClient
from importer.oci.store import LayerUpload
from importer.oci.upload import BlobUpload

log = logging.getLogger(__name__)


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
        layer: LayerUpload,
        layer_desc: Descriptor,
        config: bytes,
    ) -> str:
        if not isinstance(layer, RegistryLayerUpload):
            raise TypeError(f"a registry store cannot publish a {type(layer).__name__}")
        await layer.flush()
        await layer.upload.finish(layer_desc.digest)
        config_digest = await self.client.push_blob(repo, config)
        manifest = manifest_blob(Descriptor(CONFIG_TYPE, config_digest, len(config)), layer_desc)
        return await self.client.put_manifest(repo, tag, manifest, MANIFEST_TYPE)

    async def remove(self, repo: str, tag: str) -> None:
        await self.client.delete_manifest(repo, tag)

    async def copy(self, src_repo: str, src_tag: str, dst_repo: str, dst_tag: str) -> None:
        """Makes `dst_repo:dst_tag` the same image as `src_repo:src_tag`: blobs mounted
        (one copy of the bytes in the registry), the same manifest under the new tag."""
        try:
            body, media_type, _ = await self.client.get_manifest(src_repo, src_tag)
        except RegistryError as exc:
            if exc.status == 404:
                raise SourceUnreachable(
                    f"DVCR has no image {src_repo}:{src_tag} to copy: {exc.message}"
                ) from None
            raise
        await self._copy_manifest(src_repo, dst_repo, body, media_type, depth=0)
        await self.client.put_manifest(dst_repo, dst_tag, body, media_type)

    async def _copy_manifest(
        self, src_repo: str, dst_repo: str, body: bytes, media_type: str, depth: int
    ) -> None:
        """Everything the manifest names, into dst_repo (an index's manifests by digest)."""
        try:
            document: Any = json.loads(body)
        except ValueError:
            raise InvalidImage(f"the manifest in {src_repo} is not JSON") from None
        if not isinstance(document, dict):
            raise InvalidImage(f"the manifest in {src_repo} is not a JSON object")
        kind = media_type or document.get("mediaType", "")
        if kind in (OCI_INDEX, DOCKER_MANIFEST_LIST) or "manifests" in document:
            if depth >= 3:
                raise InvalidImage(f"the indexes in {src_repo} are nested too deeply")
            for child in document.get("manifests", []):
                child_body, child_type, digest = await self.client.get_manifest(
                    src_repo, child["digest"]
                )
                await self._copy_manifest(src_repo, dst_repo, child_body, child_type, depth + 1)
                await self.client.put_manifest(dst_repo, digest, child_body, child_type)
            return
        for desc in [document.get("config"), *document.get("layers", [])]:
            if desc:
                await self._copy_blob(src_repo, dst_repo, desc["digest"])

    async def _copy_blob(self, src_repo: str, dst_repo: str, digest: str) -> None:
        if await self.client.blob_exists(dst_repo, digest) is not None:
            return
        if await self.client.mount_blob(dst_repo, digest, from_repo=src_repo):
            return
        log.warning(
            "the registry refused to mount blob %s from %s into %s; copying its bytes",
            digest,
            src_repo,
            dst_repo,
        )
        upload = await self.client.start_blob_upload(dst_repo)
        try:
            async for chunk in self.client.get_blob(src_repo, digest):
                await upload.write(chunk)
            await upload.finish(digest)  # the registry checks the digest
        except BaseException:
            await upload.cancel()
            raise

    def open_disk(self, repo: str, tag: str) -> AbstractAsyncContextManager[DiskFile]:
        """The disk file of the DVCR image `repo:tag`, streamed from the registry."""
        return self._open_disk(repo, tag)

    @asynccontextmanager
    async def _open_disk(self, repo: str, tag: str) -> AsyncIterator[DiskFile]:
        async with open_registry_disk(
            self.client, repo, tag, what=f"the DVCR image {repo}:{tag}"
        ) as disk:
            yield disk

    async def close(self) -> None:
        await self.client.close()
