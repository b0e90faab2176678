"""The embedded DVCR: an OCI image layout directory, written atomically.

Blobs land under temporary names in `blobs/sha256/` and are renamed to their digest once
complete; `index.json` is replaced atomically. References are `repo:tag` under the
annotation `org.opencontainers.image.ref.name`, readable by
`skopeo copy oci:DIR:vi/NS/NAME:UID ...`.

A copy is one more reference to the same manifest: the blobs are shared, and removing a
reference deletes only the blobs no remaining reference (or the index it names) uses.
`open_disk` streams the disk file of an image back out of its layer blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from importer.errors import ProvisioningFailed, SourceUnreachable, StorageFull
from importer.oci.disklayer import DiskFile, FileSource, disk_from_layers
from importer.oci.image import CONFIG_TYPE, MANIFEST_TYPE, Descriptor, digest_of, manifest_blob
from importer.oci.pull import DEFAULT_PLATFORM, ManifestGetter, Platform, image_layers
from importer.oci.store import LayerUpload
from importer.writeback import WRITEBACK_EVERY, start_writeback

REF_ANNOTATION = "org.opencontainers.image.ref.name"
_TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(exc: OSError, what: str) -> Exception:
    if exc.errno in (28, 122):  # ENOSPC, EDQUOT
        return StorageFull(f"the DVCR storage is full while {what}")
    return ProvisioningFailed(f"{what} failed: {exc.strerror}")


class LayoutBlobUpload:
    """A layer being written to a temporary file of the layout."""

    def __init__(self, layout: OciLayout) -> None:
        self.layout = layout
        self.path = layout.blobs / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        self.written = 0
        self._written_at_writeback = 0
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _os_error(exc, "creating a layer blob") from None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while len(view):
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise _os_error(exc, "writing the layer") from None
        self.written += len(data)
        if self.written - self._written_at_writeback >= WRITEBACK_EVERY:
            start_writeback(self.fd)
            self._written_at_writeback = self.written

    def _commit(self, digest: str) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.path, self.layout.blob_path(digest))

    async def cancel(self) -> None:
        def drop() -> None:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

        await asyncio.to_thread(drop)


class OciLayout:
    """One layout directory shared by every transfer of a server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.index_path = root / "index.json"
        self._lock = asyncio.Lock()
        self.blobs.mkdir(parents=True, exist_ok=True)
        layout_file = root / "oci-layout"
        if not layout_file.exists():
            layout_file.write_text('{"imageLayoutVersion":"1.0.0"}')
        if not self.index_path.exists():
            self._write_index({"schemaVersion": 2, "manifests": []})
        for leftover in self.blobs.glob(f"{_TMP_PREFIX}*"):
            leftover.unlink()  # from transfers cut by a stop

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")

    def reference(self, repo: str, tag: str) -> str:
        return f"oci:{self.root.resolve()}:{repo}:{tag}"

    async def begin_layer(self, repo: str) -> LayoutBlobUpload:
        return await asyncio.to_thread(LayoutBlobUpload, self)

    async def publish(
        self, repo: str, tag: str, layer: LayerUpload, layer_desc: Descriptor, config: bytes
    ) -> str:
        """Makes the image visible under `repo:tag`, all or nothing; returns the manifest digest.
        `layer` is one this layout began."""
        if not isinstance(layer, LayoutBlobUpload):
            raise TypeError(f"an OCI layout cannot publish a {type(layer).__name__}")
        async with self._lock:
            return await asyncio.to_thread(
                self._publish, f"{repo}:{tag}", layer, layer_desc, config
            )

    def _publish(
        self, ref: str, layer: LayoutBlobUpload, layer_desc: Descriptor, config: bytes
    ) -> str:
        try:
            layer._commit(layer_desc.digest)
            config_desc = Descriptor(CONFIG_TYPE, *self._put_blob(config))
            manifest = manifest_blob(config_desc, layer_desc)
            manifest_digest, manifest_size = self._put_blob(manifest)
            index = self._read_index()
            index["manifests"] = [m for m in index["manifests"] if self._ref_of(m) != ref]
            index["manifests"].append(
                {
                    **Descriptor(MANIFEST_TYPE, manifest_digest, manifest_size).to_json(),
                    "annotations": {REF_ANNOTATION: ref},
                }
            )
            self._write_index(index)
            _fsync_dir(self.blobs)
            return manifest_digest
        except OSError as exc:
            raise _os_error(exc, "storing the image in DVCR") from None

    async def remove(self, repo: str, tag: str) -> None:
        """Drops the reference and every blob no other reference uses."""
        async with self._lock:
            await asyncio.to_thread(self._remove, f"{repo}:{tag}")

    def _remove(self, ref: str) -> None:
        index = self._read_index()
        kept = [m for m in index["manifests"] if self._ref_of(m) != ref]
        if len(kept) == len(index["manifests"]):
            return
        index["manifests"] = kept
        self._write_index(index)
        self._collect_garbage(index)

    async def copy(self, src_repo: str, src_tag: str, dst_repo: str, dst_tag: str) -> None:
        """Makes `dst_repo:dst_tag` name the image of `src_repo:src_tag` (the same manifest,
        no blob copied); an image already under the destination name is replaced."""
        async with self._lock:
            await asyncio.to_thread(self._copy, f"{src_repo}:{src_tag}", f"{dst_repo}:{dst_tag}")

    def _copy(self, src: str, dst: str) -> None:
        try:
            index = self._read_index()
            entry = next((m for m in index["manifests"] if self._ref_of(m) == src), None)
            if entry is None:
                raise SourceUnreachable(f"DVCR has no image {src} to copy")
            if src == dst:
                return
            copied = json.loads(json.dumps(entry))
            copied["annotations"] = {**copied.get("annotations", {}), REF_ANNOTATION: dst}
            replaced = [m for m in index["manifests"] if self._ref_of(m) == dst]
            index["manifests"] = [m for m in index["manifests"] if self._ref_of(m) != dst]
            index["manifests"].append(copied)
            self._write_index(index)
            if replaced:
                self._collect_garbage(index)
        except OSError as exc:
            raise _os_error(exc, f"copying {src} to {dst} in DVCR") from None

    def open_disk(self, repo: str, tag: str) -> AbstractAsyncContextManager[DiskFile]:
        """The disk file of the image `repo:tag`, read from its blob by worker threads."""
        return self._open_disk(repo, tag)

    @asynccontextmanager
    async def _open_disk(self, repo: str, tag: str) -> AsyncIterator[DiskFile]:
        ref = f"{repo}:{tag}"
        what = f"the DVCR image {ref}"
        layers = await image_layers(
            self._manifest_getter(ref), ref, Platform.parse(DEFAULT_PLATFORM), what
        )

        def open_blob(layer: Descriptor) -> FileSource:
            return FileSource(self.blob_path(layer.digest), what)

        async with disk_from_layers(layers, open_blob) as disk:
            yield disk

    def _manifest_getter(self, ref: str) -> ManifestGetter:
        """Manifests by the reference name in index.json, or by digest."""

        def read(reference: str) -> tuple[bytes, str]:
            media_type = ""
            digest = reference
            if not reference.startswith("sha256:"):
                entry = next(
                    (m for m in self._read_index()["manifests"] if self._ref_of(m) == reference),
                    None,
                )
                if entry is None:
                    raise SourceUnreachable(f"DVCR has no image {reference}")
                digest, media_type = entry["digest"], entry.get("mediaType", "")
            try:
                return self.blob_path(digest).read_bytes(), media_type
            except FileNotFoundError:
                raise SourceUnreachable(
                    f"the manifest {digest} of the DVCR image {ref} is missing"
                ) from None
            except OSError as exc:
                raise SourceUnreachable(f"reading the DVCR image {ref}: {exc.strerror}") from None

        async def get(reference: str) -> tuple[bytes, str]:
            return await asyncio.to_thread(read, reference)

        return get

    def refs(self) -> list[str]:
        return [self._ref_of(m) for m in self._read_index()["manifests"]]

    def _collect_garbage(self, index: dict[str, Any]) -> None:
        used: set[str] = set()
        for entry in index["manifests"]:
            self._mark_used(entry["digest"], used)
        for blob in self.blobs.iterdir():
            if not blob.name.startswith(_TMP_PREFIX) and blob.name not in used:
                blob.unlink()

    def _mark_used(self, digest: str, used: set[str], depth: int = 0) -> None:
        """The manifest `digest` and what it names: config and layers, or (an index) the
        manifests it lists, and theirs."""
        used.add(digest.removeprefix("sha256:"))
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            manifest = json.loads(self.blob_path(digest).read_bytes())
            for desc in [manifest.get("config"), *manifest.get("layers", [])]:
                if desc:
                    used.add(desc["digest"].removeprefix("sha256:"))
            if depth < 3:
                for child in manifest.get("manifests", []):
                    self._mark_used(child["digest"], used, depth + 1)

    def _put_blob(self, data: bytes) -> tuple[str, int]:
        digest = digest_of(data)
        target = self.blob_path(digest)
        if not target.exists():
            self._write_atomically(target, data)
        return digest, len(data)

    def _write_atomically(self, target: Path, data: bytes) -> None:
        temp = target.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)

    def _read_index(self) -> dict[str, Any]:
        index: dict[str, Any] = json.loads(self.index_path.read_text())
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        self._write_atomically(self.index_path, json.dumps(index, indent=1).encode())
        _fsync_dir(self.root)

    @staticmethod
    def _ref_of(entry: dict[str, Any]) -> str:
        ref: str = entry.get("annotations", {}).get(REF_ANNOTATION, "")
        return ref
