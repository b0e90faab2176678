"""The life of an image as the control API sees it: create, read, replace, delete.

A new image (or one whose spec changed) begins: an Upload gets its upload URLs and waits
for them; any other source starts its import. A spec may change until the image is Ready
(a Failed image starts over); a deletion cancels what fills the image, waits for imports
that read it, and removes its data before its record.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from uploader.errors import (
    AlreadyExists,
    ApiError,
    Conflict,
    Invalid,
    NotFound,
    SpecImmutable,
    TooManyImages,
)
from uploader.resources import Kind, validate_manifest
from uploader.server.config import ServerConfig
from uploader.server.destinations import Storage
from uploader.server.image_db import Event, Object, Store
from uploader.server.image_model import (
    PENDING,
    READY,
    TERMINATING,
    Image,
    image_key,
    now_rfc3339,
    shown,
)
from uploader.server.image_states import ImageStates
from uploader.server.imports import Imports, ReadLocks
from uploader.server.transfers import Transfers
from uploader.server.upload_tokens import ImageKey, UploadTokens, new_token, redact

log = logging.getLogger(__name__)


class ImageLifecycle:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        states: ImageStates,
        tokens: UploadTokens,
        storage: Storage,
        transfers: Transfers,
        imports: Imports,
        locks: ReadLocks,
        metrics_forget: Callable[[str], None],
    ) -> None:
        self.config = config
        self.store = store
        self.states = states
        self.tokens = tokens
        self.storage = storage
        self.transfers = transfers
        self.imports = imports
        self.locks = locks
        self._metrics_forget = metrics_forget
        locks.on_last_reader = self._finish_deferred_delete
        self.external_base = ""
        self.in_cluster_base = ""

    def set_upload_bases(self, external: str, in_cluster: str) -> None:
        self.external_base = external.rstrip("/")
        self.in_cluster_base = in_cluster.rstrip("/")

    # -- reading --------------------------------------------------------------------------

    def get(self, kind: Kind, namespace: str | None, name: str) -> Object:
        manifest = self.store.get(image_key(kind, namespace, name))
        if manifest is None:
            raise NotFound(f'{kind.display} "{name}" not found')
        return manifest

    def exists(self, kind: Kind, namespace: str | None, name: str) -> bool:
        return self.store.get(image_key(kind, namespace, name)) is not None

    def list(self, kind: Kind, namespace: str | None) -> list[Object]:
        return self.store.list(kind.name, namespace if kind.namespaced else None)

    @property
    def version(self) -> int:
        return self.store.version

    def watch(
        self, kind: Kind, namespace: str | None, name: str | None
    ) -> AsyncGenerator[Event, None]:
        return self.store.watch(kind.name, namespace, name)

    # -- changing -------------------------------------------------------------------------

    async def create(self, kind: Kind, namespace: str | None, doc: Any) -> Object:
        manifest = validate_manifest(doc, kind, namespace)
        image = Image(manifest)
        if self.store.get(image.key) is not None:
            raise AlreadyExists(f'{kind.display} "{image.name}" already exists')
        self._check_quota(kind, namespace)
        manifest["metadata"].update(
            uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1
        )
        manifest["status"] = {"phase": PENDING}
        image.set_phase(PENDING, PENDING, "Waiting for the data source")
        self.begin(image)
        return self.store.get(image.key) or manifest

    def _check_quota(self, kind: Kind, namespace: str | None) -> None:
        limit, total = self.config.max_images, self.store.count(kind.name)
        if kind.namespaced and namespace is not None:
            per_namespace = self.store.count(kind.name, namespace)
            if per_namespace >= self.config.max_images_per_namespace:
                raise TooManyImages(
                    f'exceeded quota: the namespace "{namespace}" has {per_namespace} '
                    f"{kind.plural}, the most this server allows per namespace "
                    "(--max-images-per-namespace); delete some first"
                )
        if total >= limit:
            raise TooManyImages(
                f"exceeded quota: the server holds {total} {kind.plural}, the most it allows "
                "(--max-images); delete some first"
            )

    async def replace(self, kind: Kind, namespace: str | None, name: str, doc: Any) -> Object:
        current = Image(self.get(kind, namespace, name))
        new = validate_manifest(doc, kind, namespace)
        if new["metadata"]["name"] != name:
            raise Invalid(
                f'metadata.name: Invalid value: "{new["metadata"]["name"]}": '
                f'must be "{name}", the name in the URL'
            )
        metadata = current.manifest["metadata"]
        if new["spec"] == current.spec:
            metadata.update(
                {k: v for k, v in new["metadata"].items() if k in ("labels", "annotations")}
            )
            return self.store.save(current.manifest)
        if current.phase in (READY, TERMINATING):
            raise SpecImmutable(
                f'{kind.display} "{name}" is {current.phase}: its spec cannot change any '
                "more; delete it and create it again"
            )
        key = current.key
        await self._cancel(key, Conflict("the image's spec changed; upload again"))
        current = Image(self.get(kind, namespace, name))
        metadata = current.manifest["metadata"]
        self.tokens.forget(key)
        current.manifest["spec"] = new["spec"]
        for meta_key in ("labels", "annotations"):
            if meta_key in new["metadata"]:
                metadata[meta_key] = new["metadata"][meta_key]
        metadata["generation"] = current.generation + 1
        current.manifest["status"] = {"phase": PENDING}
        current.set_phase(PENDING, PENDING, "The spec changed; starting over")
        self.begin(current)
        return self.get(kind, namespace, name)

    async def delete(self, kind: Kind, namespace: str | None, name: str) -> Object:
        image = Image(self.get(kind, namespace, name))
        key = image.key
        if self.locks.is_deferred(key):
            return image.manifest
        self.tokens.forget(key)
        if self.locks.is_read(key):
            image.set_phase(
                TERMINATING,
                TERMINATING,
                "The image is being deleted once the imports that read it end",
            )
            self.locks.defer_delete(key)
            return self.store.save(image.manifest, essential=True)
        image.set_phase(TERMINATING, TERMINATING, "The image is being deleted")
        image = self.states.save(image, essential=True)
        await self._cancel(key, NotFound("the image was deleted during the upload"))
        await self.remove(image)
        return image.manifest

    async def remove(self, image: Image) -> None:
        """Removes the image's data, then its record."""
        try:
            await self.storage.remove_data(image.manifest)
        except OSError as exc:
            # The record goes anyway: an image nobody can delete is worse than stray data.
            log.warning("the data of %s stays behind: %s", shown(image.key), exc)
        self._metrics_forget(image.uid)
        self.store.delete(image.key)
        await asyncio.to_thread(self.store.keep_reserve)

    async def _cancel(self, key: ImageKey, reason: ApiError) -> None:
        await self.transfers.cancel(key, reason)
        await self.imports.cancel(key)

    async def _finish_deferred_delete(self, key: ImageKey) -> None:
        image = self.states.get(key)
        if image is not None:
            await self.remove(image)

    # -- beginning ------------------------------------------------------------------------

    def begin(self, image: Image) -> None:
        """Moves a new (or restarted) image out of Pending according to its data source."""
        key = image.key
        image.status["target"] = self.storage.target_status(image.manifest)
        if image.is_upload:
            token = new_token()
            image.status["imageUploadURLs"] = {
                "external": f"{self.external_base}/upload/{token}",
                "inCluster": f"{self.in_cluster_base}/upload/{token}",
            }
            self.tokens.wait(token, key)
            self.states.wait_for_upload(image, "Waiting for upload")
            log.info("image %s waits for upload, token %s", shown(key), redact(token))
        image.status["observedGeneration"] = image.generation
        image = self.states.save(image)
        if not image.is_upload:
            self.imports.start(image)
