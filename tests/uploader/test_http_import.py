"""`dataSource.type: HTTP` into PVC storage, from a real nginx."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from diskimages import MiB, qemu_convert, sha256_file, write_disk_image
from flakyhttp import CuttingProxy, Faults, FlakyServer
from nginxproc import Nginx
from serverproc import Server
from testcerts import make_ca, make_server_cert


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


# -- every format, both storages ------------------------------------------------------------

FORMATS = {
    "qcow2": ("qcow2", ()),
    "vmdk": ("vmdk", ("-o", "subformat=streamOptimized")),
    "vhd": ("vpc", ()),
    "vhdx": ("vhdx", ()),
    "vdi": ("vdi", ()),
}


@pytest.mark.parametrize("storage", ["PersistentVolumeClaim", "ContainerRegistry"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_into_each_storage(
    server: Server, nginx: Nginx, tmp_path: Path, name: str, storage: str
) -> None:
    raw = tmp_path / "disk.raw"
    raw_sha256, _ = write_disk_image(raw, 12 * MiB, seed=24)
    fmt, options = FORMATS[name]
    image = qemu_convert(raw, fmt, nginx.files / f"disk.{name}", *options)
    doc = http_manifest("img", f"{nginx.url}/disk.{name}")
    doc["spec"]["storage"] = storage
    server.create(doc)
    obj = server.wait_phase("img", ("Ready", "Failed"))
    status = obj["status"]
    assert status["phase"] == "Ready", status
    assert status["format"] == name
    assert status["checksum"]["sha256"] == sha256_file(image)
    assert int(status["size"]["unpackedBytes"]) >= 12 * MiB
    if storage == "PersistentVolumeClaim":
        disk = server.claim_dir("img") / "disk.img"
        with open(disk, "r+b") as f:
            f.truncate(12 * MiB)  # vhd rounds the size up to its geometry
        assert sha256_file(disk) == raw_sha256


# -- broken downloads -------------------------------------------------------------------------


async def test_a_cut_download_continues_with_ranges(
    server: Server, nginx: Nginx, tmp_path: Path
) -> None:
    raw = tmp_path / "disk.raw"
    raw_sha256, _ = write_disk_image(raw, 24 * MiB, seed=25)
    qcow2 = qemu_convert(raw, "qcow2", nginx.files / "disk.qcow2")
    for name, storage in (("in-pvc", "PersistentVolumeClaim"), ("in-dvcr", "ContainerRegistry")):
        async with CuttingProxy(nginx.port, cut_after=5 * MiB, cuts=2) as proxy:
            doc = http_manifest(name, proxy.url("/disk.qcow2"))
            doc["spec"]["storage"] = storage
            server.create(doc)
            obj = await asyncio.to_thread(server.wait_phase, name, ("Ready", "Failed"))
            assert proxy.cut == 2
        assert obj["status"]["phase"] == "Ready", obj["status"]
        assert obj["status"]["checksum"]["sha256"] == sha256_file(qcow2)
    assert sha256_file(server.claim_dir("in-pvc") / "disk.img") == raw_sha256
    log = server.log_path.read_text()
    assert log.count("trying again at byte") == 4
    assert "trying again at byte 0 " not in log


async def test_a_download_that_cannot_continue_starts_over(server: Server, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw_sha256, _ = write_disk_image(raw, 8 * MiB, seed=26)
    data = raw.read_bytes()
    # No Range support, and the first answer breaks off halfway: only starting over helps.
    faults = Faults(ranges=False, drop_after=4 * MiB, drops=1)
    async with FlakyServer(data, faults) as flaky:
        server.create(http_manifest("again", flaky.url))
        obj = await asyncio.to_thread(server.wait_phase, "again", ("Ready", "Failed"))
        assert len(flaky.requests) == 2
    assert obj["status"]["phase"] == "Ready", obj["status"]
    assert obj["status"]["checksum"]["sha256"] == raw_sha256
    assert sha256_file(server.claim_dir("again") / "disk.img") == raw_sha256
    assert "starting the transfer over" in server.log_path.read_text()


@pytest.fixture
def https_nginx(tmp_path: Path) -> Iterator[tuple[Nginx, bytes]]:
    """nginx with an HTTPS listener whose certificate comes from a CA made for the test;
    yields it and the CA's PEM."""
    ca = make_ca()
    leaf = make_server_cert(ca)
    (tmp_path / "tls.crt").write_bytes(leaf.cert_pem)
    (tmp_path / "tls.key").write_bytes(leaf.key_pem)
    srv = Nginx(tmp_path / "https-nginx", tls=(tmp_path / "tls.crt", tmp_path / "tls.key"))
    srv.start()
    try:
        yield srv, ca.cert_pem
    finally:
        srv.stop()


def test_https_import_with_the_ca_bundle(
    server: Server, https_nginx: tuple[Nginx, bytes], tmp_path: Path
) -> None:
    nginx, ca_pem = https_nginx
    sha256, _ = write_disk_image(nginx.files / "disk.img", 8 * MiB, seed=27)
    url = f"{nginx.https_url}/disk.img"
    server.create(http_manifest("trusted", url, caBundle=base64.b64encode(ca_pem).decode()))
    server.create(http_manifest("untrusted", url))
    trusted = server.wait_phase("trusted", ("Ready", "Failed"))
    assert trusted["status"]["phase"] == "Ready", trusted["status"]
    assert sha256_file(server.claim_dir("trusted") / "disk.img") == sha256
    untrusted = server.wait_phase("untrusted", ("Ready", "Failed"))
    condition = untrusted["status"]["conditions"][0]
    assert untrusted["status"]["phase"] == "Failed"
    assert condition["reason"] == "SourceUnreachable"
    assert "certificate" in condition["message"].lower(), condition["message"]
    assert not (server.claim_dir("untrusted") / "disk.img").exists()
