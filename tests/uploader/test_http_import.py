"""`dataSource.type: HTTP` into PVC storage, from a real nginx."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from diskimages import MiB, sha256_file, write_disk_image
from nginxproc import Nginx
from serverproc import Server


def http_manifest(name: str, url: str, **http: Any) -> dict[str, Any]:
    return {
        "apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": "VirtualImage",
        "metadata": {"name": name},
        "spec": {
            "storage": "PersistentVolumeClaim",
            "dataSource": {"type": "HTTP", "http": {"url": url, **http}},
        },
    }


def test_http_import_into_pvc(server: Server, nginx: Nginx) -> None:
    sha256, _ = write_disk_image(nginx.files / "ubuntu.img", 64 * MiB, seed=21)
    md5 = hashlib.md5((nginx.files / "ubuntu.img").read_bytes()).hexdigest()
    server.create(
        http_manifest(
            "ubuntu-22.04-pvc", f"{nginx.url}/ubuntu.img", checksum={"md5": md5, "sha256": sha256}
        )
    )
    obj = server.wait_phase("ubuntu-22.04-pvc", ("Ready", "Failed"))
    status = obj["status"]
    assert status["phase"] == "Ready", status
    assert status["checksum"] == {"sha256": sha256, "md5": md5}
    assert status["progress"] == "100%"
    assert status["size"]["unpackedBytes"] == str(64 * MiB)
    assert "imageUploadURLs" not in status
    assert sha256_file(server.claim_dir("ubuntu-22.04-pvc") / "disk.img") == sha256


def test_http_import_checksum_mismatch(server: Server, nginx: Nginx) -> None:
    (nginx.files / "img").write_bytes(os.urandom(2 * MiB))
    server.create(http_manifest("bad-sum", f"{nginx.url}/img", checksum={"sha256": "1" * 64}))
    obj = server.wait_phase("bad-sum", ("Ready", "Failed"))
    assert obj["status"]["phase"] == "Failed"
    assert obj["status"]["conditions"][0]["reason"] == "BadImageChecksum"
    assert not (server.claim_dir("bad-sum") / "disk.img").exists()


@pytest.mark.parametrize("path", ["/missing.img", None])
def test_http_import_unreachable(server: Server, nginx: Nginx, path: str | None) -> None:
    url = f"{nginx.url}{path}" if path else "http://127.0.0.1:9/image.img"
    server.create(http_manifest("away", url))
    obj = server.wait_phase("away", ("Ready", "Failed"))
    condition = obj["status"]["conditions"][0]
    assert obj["status"]["phase"] == "Failed"
    assert condition["reason"] == "SourceUnreachable"
    assert ("404" in condition["message"]) if path else ("cannot reach" in condition["message"])
