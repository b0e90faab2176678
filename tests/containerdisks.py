"""containerDisk images for tests: tar layers with `disk/…`, an OCI layout written by hand,
pushed to a real registry with skopeo (or, for an uncompressed layer, which skopeo would
compress, with the registry client)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diskimages import MiB, qemu_convert, write_disk_image

from importer.oci.registry import OCI_INDEX, OCI_MANIFEST, RegistryClient

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
REF_ANNOTATION = "org.opencontainers.image.ref.name"


def make_qcow2(directory: Path, seed: int, size: int = 8 * MiB) -> bytes:
    """The bytes of a small qcow2 image made by qemu-img from random data."""
    raw = directory / f"disk-{seed}.raw"
    write_disk_image(raw, size, seed=seed)
    qcow2 = qemu_convert(raw, "qcow2", directory / f"disk-{seed}.qcow2")
    raw.unlink()
    return qcow2.read_bytes()


@dataclass
class Entry:
    name: str
    data: bytes | None = None  # None: a directory
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""


def tar_layer(*entries: Entry, tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = 0
            if entry.data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            elif entry.kind != tarfile.REGTYPE:
                info.type = entry.kind
                info.linkname = entry.linkname
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(entry.data))
    return buffer.getvalue()


def disk_layer(data: bytes, filename: str = "disk.qcow2", prefix: str = "") -> bytes:
    """The usual containerDisk layer: `disk/` and `disk/{filename}`."""
    return tar_layer(Entry(f"{prefix}disk"), Entry(f"{prefix}disk/{filename}", data))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout directory, written blob by blob."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.refs: list[dict[str, Any]] = []
        self._write_index()

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = sha256(data)
        (self.blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(
        self, layers: list[tuple[bytes, str]], os_name: str = "linux", arch: str = "amd64"
    ) -> dict[str, Any]:
        """An image manifest of these (blob, media type) layers, bottom first."""
        descriptors = [self.blob(data, media_type) for data, media_type in layers]
        config = json.dumps(
            {
                "architecture": arch,
                "os": os_name,
                "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
            }
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.blob(config, OCI_CONFIG),
            "layers": descriptors,
        }
        descriptor = self.blob(json.dumps(manifest).encode(), OCI_MANIFEST)
        descriptor["platform"] = {"os": os_name, "architecture": arch}
        return descriptor

    def index(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return self.blob(json.dumps(index).encode(), OCI_INDEX)

    def tag(self, ref: str, descriptor: dict[str, Any]) -> str:
        entry = {k: v for k, v in descriptor.items() if k != "platform"}
        self.refs.append({**entry, "annotations": {REF_ANNOTATION: ref}})
        self._write_index()
        return f"oci:{self.root}:{ref}"

    def _write_index(self) -> None:
        index = {"schemaVersion": 2, "manifests": self.refs}
        (self.root / "index.json").write_text(json.dumps(index))


def skopeo_push(source: str, destination: str, *flags: str, cache_dir: Path) -> None:
    """`skopeo copy SOURCE docker://DESTINATION` to a plain-HTTP or self-signed registry.
    A private blob-info cache keeps skopeo from reusing blobs another test pushed."""
    env = {**os.environ, "XDG_DATA_HOME": str(cache_dir)}
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", *flags, source, f"docker://{destination}"],
        check=True,
        capture_output=True,
        timeout=120,
        env=env,
    )


def skopeo_manifest(image: str, *flags: str) -> dict[str, Any]:
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", *flags, f"docker://{image}"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    return json.loads(raw)


async def push_direct(
    client: RegistryClient, repo: str, tag: str, layers: list[tuple[bytes, str]]
) -> str:
    """An image pushed blob by blob as given (skopeo would compress a plain tar layer);
    returns the manifest digest."""
    descriptors = []
    for data, media_type in layers:
        digest = await client.push_blob(repo, data)
        descriptors.append({"mediaType": media_type, "digest": digest, "size": len(data)})
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
        }
    ).encode()
    config_digest = await client.push_blob(repo, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": descriptors,
    }
    return await client.put_manifest(repo, tag, json.dumps(manifest).encode(), OCI_MANIFEST)
