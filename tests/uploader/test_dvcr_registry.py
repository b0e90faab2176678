"""ContainerRegistry storage in a real docker-registry, read back with skopeo."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskimages import MiB, write_disk_image
from dvcrimage import check_image, skopeo_copy
from registryproc import Registry
from serverproc import Server, curl, manifest


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    running = Registry(tmp_path / "registry").start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def dvcr_server(tmp_path: Path, registry: Registry) -> Iterator[Server]:
    srv = Server(tmp_path / "data", "--dvcr", registry.host).start()
    try:
        yield srv
    finally:
        srv.stop()


def tags(registry: Registry, repo: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{registry.url}/v2/{repo}/tags/list") as response:
            return json.loads(response.read()).get("tags") or []
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
        return []


def test_upload_into_the_registry(dvcr_server: Server, registry: Registry, tmp_path: Path) -> None:
    image = tmp_path / "cirros.img"
    sha256, _ = write_disk_image(image, 32 * MiB, seed=51)
    md5 = hashlib.md5(image.read_bytes()).hexdigest()
    dvcr_server.create(manifest("some-image", storage="ContainerRegistry", checksum={"md5": md5}))
    code, body = curl("-T", str(image), dvcr_server.upload_url("some-image"))
    assert code == 200, body
    obj = dvcr_server.get("some-image")
    uid = obj["metadata"]["uid"]
    ref = f"{registry.host}/vi/default/some-image:{uid}"
    assert obj["status"]["target"] == {"registryURL": ref}

    out = tmp_path / "copy"
    copied = skopeo_copy(f"docker://{ref}", out, "--src-tls-verify=false")
    labels = check_image(out, copied, sha256)
    assert labels == {
        "source-image-size": str(32 * MiB),
        "source-image-virtual-size": str(32 * MiB),
        "source-image-format": "raw",
        "checksum-md5": md5,
        "checksum-sha256": sha256,
    }
    assert tags(registry, "vi/default/some-image") == [uid]

    dvcr_server.call("DELETE", dvcr_server.images_path(name="some-image"))
    assert tags(registry, "vi/default/some-image") == []


def test_refused_upload_leaves_no_tag(
    dvcr_server: Server, registry: Registry, tmp_path: Path
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(6 * MiB))
    dvcr_server.create(manifest("bad", storage="ContainerRegistry", checksum={"sha256": "3" * 64}))
    code, body = curl("-T", str(image), dvcr_server.upload_url("bad"))
    assert code == 422
    assert body["reason"] == "BadImageChecksum"
    assert tags(registry, "vi/default/bad") == []
    assert not list((registry.storage).rglob("_uploads/*/data"))


def test_registry_stopped_mid_push(dvcr_server: Server, registry: Registry, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(64 * MiB))
    dvcr_server.create(manifest("cut", storage="ContainerRegistry"))
    url = dvcr_server.upload_url("cut")
    proc = subprocess.Popen(
        [
            "curl",
            "-sS",
            "--limit-rate",
            "8M",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-T",
            str(image),
            url,
        ],
        stdout=subprocess.PIPE,
    )
    dvcr_server.wait_phase("cut", ("Provisioning",))
    time.sleep(1)
    registry.kill()
    out, _ = proc.communicate(timeout=120)
    assert out != b"200"
    status = dvcr_server.wait_phase("cut", ("Failed",), timeout=60)["status"]
    assert status["conditions"][0]["reason"] == "ProvisioningFailed"
    assert "blob" in status["conditions"][0]["message"]
    registry.start()
    assert tags(registry, "vi/default/cut") == []


def test_eight_pushes_at_once(dvcr_server: Server, registry: Registry, tmp_path: Path) -> None:
    images = []
    for i in range(8):
        path = tmp_path / f"disk{i}.raw"
        sha256, _ = write_disk_image(path, (8 + i) * MiB, seed=60 + i)
        dvcr_server.create(manifest(f"many-{i}", storage="ContainerRegistry"))
        images.append((path, sha256, dvcr_server.upload_url(f"many-{i}")))
    procs = [
        subprocess.Popen(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(p), url],
            stdout=subprocess.PIPE,
        )
        for p, _, url in images
    ]
    assert [p.communicate(timeout=300)[0] for p in procs] == [b"200"] * 8
    for i, (_, sha256, _) in enumerate(images):
        obj = dvcr_server.get(f"many-{i}")
        out = tmp_path / f"copy{i}"
        copied = skopeo_copy(
            f"docker://{obj['status']['target']['registryURL']}", out, "--src-tls-verify=false"
        )
        check_image(out, copied, sha256)
