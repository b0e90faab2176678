"""The OCI config and manifest of a DVCR image."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_labels(
    received: int, virtual_size: int, image_format: str, checksums: dict[str, str]
) -> dict[str, str]:
    labels = {
        "source-image-size": str(received),
        "source-image-virtual-size": str(virtual_size),
        "source-image-format": image_format,
    }
    for algorithm in ("md5", "sha256"):
        if algorithm in checksums:
            labels[f"checksum-{algorithm}"] = checksums[algorithm]
    return labels


def config_blob(layer_digest: str, labels: dict[str, str]) -> bytes:
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": created, "created_by": "dvcr-uploader"}],
    }
    return json.dumps(config, separators=(",", ":")).encode()


def manifest_blob(config: Descriptor, layer: Descriptor) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": config.to_json(),
        "layers": [layer.to_json()],
    }
    return json.dumps(manifest, separators=(",", ":")).encode()
