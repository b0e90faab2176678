"""Where an image's data lives, per its `spec.storage`, in the embedded default layout.

ContainerRegistry: DVCR, by default the OCI layout `DATA_DIR/dvcr`, the image under
`vi/{ns}/{name}:{uid}` (`cvi/{name}:{uid}` for cluster images).

PersistentVolumeClaim: the claim `vi-{name}` is the directory `DATA_DIR/pvc/{ns}/vi-{name}/`.
A filesystem claim holds `disk.img`. An operator makes it a block claim by placing, before
the image is created, a symlink named `block` in that directory that points at a block
device or a pre-sized file; the image is then written there in place.

Claim directories are made with uploader/server/paths.py `under()`: they stay below
`DATA_DIR/pvc`, while a `block` link may point anywhere (the operator placed it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from importer.errors import ProvisioningFailed, TransferError
from importer.formats.base import ImageInfo, Limits
from importer.formats.snapshot import spill_files
from importer.lane import Lane
from importer.oci.auth import Credentials
from importer.oci.layout import OciLayout
from importer.oci.registry import RegistryClient
from importer.oci.registry_store import RegistryStore
from importer.oci.store import ImageStore
from importer.pipeline import Sink, SnapshottableSink, TransferResult
from importer.sinks.factory import ClaimLocation, DvcrLocation, SinkFactory
from uploader.resources import STORAGE_PVC
from uploader.server.config import ServerConfig
from uploader.server.image_db import Object
from uploader.server.paths import UnsafePath, under

BLOCK_LINK = "block"
log = logging.getLogger(__name__)


class LengthRequired(TransferError):
    """ContainerRegistry storage writes a tar header with the size before the data."""

    http_status = 411


def claim_name(obj: Object) -> str:
    return f"vi-{obj['metadata']['name']}"


def dvcr_repo(obj: Object) -> str:
    meta = obj["metadata"]
    if obj["kind"] == "ClusterVirtualImage":
        return f"cvi/{meta['name']}"
    return f"vi/{meta['namespace']}/{meta['name']}"


def uses_pvc(obj: Object) -> bool:
    storage: object = obj.get("spec", {}).get("storage")
    return storage == STORAGE_PVC


def spill_files_of(state: bytes) -> frozenset[str]:
    """The spill files a sink state needs."""
    try:
        return frozenset(spill_files(state))
    except ValueError:
        return frozenset()  # a state that cannot be read names nothing worth keeping


class KeptOnStop:
    """A sink whose partial data survives a server stop, for the upload to continue from
    its last checkpoint after the restart (an abort then only lets go)."""

    def __init__(
        self, sink: Sink, stopping: Callable[[], bool], before_commit: Callable[[], None]
    ) -> None:
        self.sink = sink
        self.stopping = stopping
        # A checkpoint must be gone before the partial file is renamed into place.
        self.before_commit = before_commit

    def lanes(self) -> Sequence[Lane]:
        return self.sink.lanes()

    def image_info(self) -> ImageInfo:
        return self.sink.image_info()

    def snapshot(self) -> bytes | None:
        return self.sink.snapshot() if isinstance(self.sink, SnapshottableSink) else None

    async def commit(self, result: TransferResult) -> None:
        self.before_commit()
        await self.sink.commit(result)

    async def abort(self) -> None:
        if not self.stopping():
            await self.sink.abort()


class Storage:
    """The storage of one server: its DVCR and its claims."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.dvcr: ImageStore = self._open_dvcr()
        # Data that arrives before the table that places it waits here, on the data disk.
        self.spill_dir = config.data_dir / "spill"
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.limits = Limits(max_virtual_size=config.max_image_size, spill_dir=str(self.spill_dir))
        self.sinks = SinkFactory(self.limits)

    def _open_dvcr(self) -> ImageStore:
        config = self.config
        if not config.dvcr:
            return OciLayout(config.data_dir / "dvcr")
        credentials = None
        if config.dvcr_auth_config:
            credentials = Credentials.from_docker_config(config.dvcr_auth_config, config.dvcr)
        ca_bundle = config.dvcr_ca_bundle.read_bytes() if config.dvcr_ca_bundle else None
        # A DVCR named host:port is tried over HTTPS first (see importer/oci/endpoint.py).
        client = RegistryClient(
            config.dvcr, credentials=credentials, ca_bundle=ca_bundle, insecure=config.dvcr_insecure
        )
        return RegistryStore(client)

    async def close(self) -> None:
        if isinstance(self.dvcr, RegistryStore):
            await self.dvcr.close()

    def claim_dir(self, obj: Object) -> Path:
        """Raises UnsafePath for a name that cannot be a directory below DATA_DIR/pvc."""
        namespace = obj["metadata"]["namespace"]
        return under(self.config.pvc_root, namespace, claim_name(obj), follow_last=True)

    @staticmethod
    def _block_link(directory: Path) -> Path | None:
        block = directory / BLOCK_LINK
        return block if block.is_symlink() or block.exists() else None

    def _claim_location(self, obj: Object) -> ClaimLocation:
        """A block claim's device or file, else the claim directory."""
        block = self._block_link(self.claim_dir(obj))
        if block is not None:
            return ClaimLocation(block.resolve(), block=True)
        return ClaimLocation(self.claim_dir(obj), block=False)

    @classmethod
    def _data_path(cls, directory: Path) -> Path:
        """Where the raw disk of a claim directory is: its block link's target, else
        `disk.img`."""
        block = cls._block_link(directory)
        return block.resolve() if block is not None else directory / "disk.img"

    def claim_data_path(self, obj: Object) -> Path:
        return self._data_path(self.claim_dir(obj))

    def disk_dir(self, namespace: str, name: str) -> Path:
        """The claim directory of the VirtualDisk `name` (see uploader/server/data_sources.py)."""
        return under(self.config.pvc_root, namespace, f"vd-{name}", follow_last=True)

    def disk_path(self, namespace: str, name: str) -> Path | None:
        path = self._data_path(self.disk_dir(namespace, name))
        return path if path.exists() else None

    def target_status(self, obj: Object) -> dict[str, str]:
        if uses_pvc(obj):
            return {"persistentVolumeClaimName": claim_name(obj)}
        return {"registryURL": self.dvcr.reference(dvcr_repo(obj), obj["metadata"]["uid"])}

    def check_length(self, obj: Object, length: int | None) -> None:
        """Raises 411 when the storage needs the length up front and it is not known."""
        if length is None and not uses_pvc(obj):
            raise LengthRequired(
                "ContainerRegistry storage needs the image's length before its data: send "
                "Content-Length (curl -T FILE does), or use PersistentVolumeClaim storage"
            )

    async def open_sink(self, obj: Object, length: int | None, filename: str | None = None) -> Sink:
        """The sink for one transfer into the image's storage."""
        if uses_pvc(obj):
            return self.sinks.claim_sink(self._claim_location(obj))
        self.check_length(obj, length)
        assert length is not None
        image = DvcrLocation(self.dvcr, dvcr_repo(obj), obj["metadata"]["uid"])
        return await self.sinks.dvcr_sink(image, length, filename)

    async def copy_image(self, repo: str, tag: str, obj: Object) -> None:
        """Tags the DVCR image `repo:tag` as `obj`'s too: the blobs are shared, not copied."""
        await self.dvcr.copy(repo, tag, dvcr_repo(obj), obj["metadata"]["uid"])

    async def resume_sink(self, obj: Object, state: bytes) -> Sink:
        """The sink of an upload that continues from its checkpoint (PVC storage)."""
        location = self._claim_location(obj).path
        try:
            return await self.sinks.resumed_claim_sink(state, location)
        except (ValueError, OSError, TransferError) as exc:
            raise ProvisioningFailed(
                f"the upload cannot continue from its checkpoint ({exc}); upload it again "
                "from byte 0"
            ) from None

    def drop_spill_files(self, paths: Iterable[str]) -> None:
        """Deletes spill files (of a sink state no longer kept, see `spill_files_of`)."""
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def clean_spill_dir(self, keep: list[bytes]) -> None:
        """At start: spill files of transfers that are gone, except the checkpoints' own."""
        kept = {os.path.abspath(path) for state in keep for path in spill_files_of(state)}
        for path in self.spill_dir.iterdir():
            if path.is_file() and os.path.abspath(path) not in kept:
                with contextlib.suppress(OSError):
                    path.unlink()

    def remove_partial(self, obj: Object) -> None:
        """Drops what an interrupted transfer left (after a crash the abort never ran)."""
        if uses_pvc(obj):
            # A name that cannot be a claim directory never had anything stored under it.
            with contextlib.suppress(FileNotFoundError, UnsafePath):
                (self.claim_dir(obj) / ".disk.img.partial").unlink()

    async def remove_data(self, obj: Object) -> None:
        """Deletes the image's stored data. A block claim's device is the operator's."""
        if not uses_pvc(obj):
            try:
                await self.dvcr.remove(dvcr_repo(obj), obj["metadata"]["uid"])
            except TransferError as exc:
                log.warning("the DVCR tag of %s stays behind: %s", dvcr_repo(obj), exc.message)
            return
        try:
            directory = self.claim_dir(obj)
        except UnsafePath:
            return  # nothing was ever stored under a name that cannot be a directory
        if self._block_link(directory) is not None:
            return

        def remove() -> None:
            shutil.rmtree(directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(directory.parent)

        await asyncio.to_thread(remove)
