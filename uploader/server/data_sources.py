"""From an image's `spec.dataSource` to what its import reads: an opened stream of bytes, or,
for one DVCR image into another, a copy that moves no bytes.

An import whose source is not there yet waits (`SourceNotReady`: the image stays Pending
and says why); a source that will never be there fails the image (a TransferError).

In the embedded default, a `VirtualDisk` named NAME in namespace NS is the claim directory
`DATA_DIR/pvc/NS/vd-NAME/`, holding `disk.img` or a `block` symlink, as image claims do.
A `ContainerImage`'s `imagePullSecret` NAME is `DATA_DIR/secrets/NS/NAME`: the
dockerconfigjson itself, or a directory holding it as `.dockerconfigjson` (a mounted
Kubernetes secret).

The spec is validated again before it is planned (an image stored by an older server may
break today's rules, a VirtualImage that reads another namespace for one), and only the
validated names and namespaces are used. HTTP and ContainerImage sources connect through
the server's address guard (importer/netguard.py).
"""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from importer.errors import SourceUnreachable
from importer.netguard import AddressGuard, ImportPolicy
from importer.oci.auth import Credentials
from importer.oci.reference import Reference
from importer.sources.disklock import hold_for_reading, in_use_by
from importer.sources.file import fd_chunks
from importer.sources.opened import OpenedSource, SourceOpener
from importer.sources.openers import container_image_source, disk_file_source, http_source
from uploader.errors import Invalid
from uploader.resources import (
    DEFAULT_SECRET_NAMESPACE,
    KINDS,
    Kind,
    ready_condition,
    source_namespace,
    validate_manifest,
)
from uploader.server.config import ServerConfig
from uploader.server.destinations import Storage, dvcr_repo, uses_pvc
from uploader.server.image_db import Object, Store
from uploader.server.paths import under
from uploader.server.upload_tokens import ImageKey

READY = "Ready"
FAILED = "Failed"
TERMINATING = "Terminating"
DOCKER_CONFIG_KEYS = (".dockerconfigjson", ".dockercfg")


class SourceNotReady(Exception):
    """The source exists but cannot be read yet; the message says what the import waits for."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class ImportPlan:
    """What one import reads. Exactly one of `open_source` and `copy_from` is set."""

    open_source: SourceOpener | None = None
    copy_from: tuple[str, str] | None = None  # a DVCR repository and tag
    source_image: ImageKey | None = None  # kept from deletion while the import runs
    source_status: dict[str, Any] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None  # drops what planning holds (a disk's lock)


def _quote(kind: str, name: str, namespace: str | None) -> str:
    where = f' in namespace "{namespace}"' if namespace else ""
    return f'{kind} "{name}"{where}'


def _checked(obj: Object) -> tuple[Kind, Object]:
    """The image's kind and its spec validated by today's rules; SourceUnreachable when it
    breaks them."""
    kind = KINDS[obj["kind"]]
    manifest = {key: obj[key] for key in ("apiVersion", "kind", "metadata", "spec")}
    try:
        return kind, validate_manifest(manifest, kind, obj["metadata"].get("namespace"))
    except Invalid as exc:
        raise SourceUnreachable(f"the image's source is not allowed: {exc.message}") from None


class SourcePlanner:
    def __init__(self, config: ServerConfig, store: Store, storage: Storage) -> None:
        self.config = config
        self.store = store
        self.storage = storage
        # Raises ValueError for an --import-allow that is not an address range.
        policy = ImportPolicy.for_server(config.loopback_only, config.import_allow)
        self.guard = AddressGuard(policy)

    async def plan(self, obj: Object) -> ImportPlan:
        kind, checked = _checked(obj)
        source = checked["spec"]["dataSource"]
        source_type = source["type"]
        own = checked["metadata"].get("namespace")
        if source_type == "HTTP":
            return ImportPlan(open_source=self._http(source["http"]))
        if source_type == "ContainerImage":
            return ImportPlan(
                open_source=self._container_image(kind, own, source["containerImage"])
            )
        if source_type == "ObjectRef":
            ref = source["objectRef"]
            if ref["kind"] == "ClusterVirtualImage":
                return self._image(obj, ref["kind"], None, ref["name"])
            field = "spec.dataSource.objectRef.namespace"
            namespace = source_namespace(kind, own, ref.get("namespace"), field)
            if ref["kind"] == "VirtualDisk":
                return self._virtual_disk(namespace, ref["name"])
            return self._image(obj, ref["kind"], namespace, ref["name"])
        raise SourceUnreachable(f"dataSource.type {source_type} has nothing to import")

    # -- HTTP and registries ------------------------------------------------------------

    def _http(self, spec: dict[str, Any]) -> SourceOpener:
        ca_bundle = base64.b64decode(spec["caBundle"]) if "caBundle" in spec else None
        return http_source(spec["url"], ca_bundle, guard=self.guard)

    def _container_image(self, kind: Kind, own: str | None, spec: dict[str, Any]) -> SourceOpener:
        image = spec["image"]
        ca_bundle = base64.b64decode(spec["caBundle"]) if "caBundle" in spec else None
        credentials = None
        if "imagePullSecret" in spec:
            secret = spec["imagePullSecret"]
            namespace = source_namespace(
                kind,
                own,
                secret.get("namespace"),
                "spec.dataSource.containerImage.imagePullSecret.namespace",
                DEFAULT_SECRET_NAMESPACE,
            )
            credentials = self._pull_credentials(image, namespace, secret["name"])
        return container_image_source(
            image, credentials=credentials, ca_bundle=ca_bundle, guard=self.guard
        )

    def _pull_credentials(self, image: str, namespace: str, name: str) -> Credentials | None:
        path = under(self.config.data_dir / "secrets", namespace, name)
        if path.is_dir():
            path = next((path / k for k in DOCKER_CONFIG_KEYS if (path / k).is_file()), path)
        if not path.is_file():
            raise SourceUnreachable(
                f'the imagePullSecret "{name}" does not exist: expected a dockerconfigjson '
                f"at {path}"
            )
        host = Reference.parse(image).endpoint_host
        credentials = Credentials.from_docker_config(path, host)
        if credentials is None:
            raise SourceUnreachable(
                f'the imagePullSecret "{name}" holds no credentials for the registry {host}'
            )
        return credentials

    # -- other images -------------------------------------------------------------------

    def _image(self, obj: Object, kind: str, namespace: str | None, name: str) -> ImportPlan:
        key: ImageKey = (kind, namespace or "", name)
        source = self.store.get(key)
        what = _quote(kind, name, namespace)
        if source is None or source["status"].get("phase") == TERMINATING:
            raise SourceUnreachable(f"the source {what} does not exist")
        status = source["status"]
        phase = status.get("phase")
        if phase == FAILED:
            condition = ready_condition(status) or {}
            raise SourceUnreachable(
                f"the source {what} failed: {condition.get('reason')}: {condition.get('message')}"
            )
        if phase != READY:
            raise SourceNotReady(f"waiting for the source {what} to be Ready; it is {phase}")
        uid = source["metadata"]["uid"]
        if not uses_pvc(source):
            if not uses_pvc(obj):
                return ImportPlan(
                    copy_from=(dvcr_repo(source), uid), source_image=key, source_status=status
                )
            repo = dvcr_repo(source)
            from_dvcr = disk_file_source(lambda: self.storage.dvcr.open_disk(repo, uid))
            return ImportPlan(open_source=from_dvcr, source_image=key)
        path = self.storage.claim_data_path(source)
        length = int(status.get("size", {}).get("unpackedBytes", "0"))
        return self._claim_reader(path, length, what, source_image=key)

    def _virtual_disk(self, namespace: str, name: str) -> ImportPlan:
        what = _quote("VirtualDisk", name, namespace)
        path = self.storage.disk_path(namespace, name)
        if path is None:
            raise SourceUnreachable(
                f"the source {what} does not exist: its claim directory "
                f"{self.storage.disk_dir(namespace, name)} holds no disk.img and no block link"
            )
        return self._claim_reader(path, None, what, source_image=None)

    def _claim_reader(
        self, path: Path, length: int | None, what: str, source_image: ImageKey | None
    ) -> ImportPlan:
        """Reads a raw disk in place, locked against writers (a VM starting) meanwhile."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceUnreachable(f"cannot open the disk of {what}: {exc.strerror}") from None
        try:
            busy = in_use_by(fd)
            if busy is None and not hold_for_reading(fd):
                busy = "a writer took it just now"
            if busy is not None:
                raise SourceNotReady(f"waiting for {what} to be free: {busy}")
            info = os.fstat(fd)
            size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(info.st_mode) else info.st_size
        except BaseException:
            os.close(fd)
            raise
        length = length or size

        @contextlib.asynccontextmanager
        async def read() -> AsyncIterator[OpenedSource]:
            yield OpenedSource(fd_chunks(fd, length, str(path)), length, "disk.img")

        return ImportPlan(open_source=read, source_image=source_image, release=lambda: os.close(fd))
