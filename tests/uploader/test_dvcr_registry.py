"""ContainerRegistry storage in a real docker-registry, read back with skopeo."""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
from diskimages import MiB, make_iso, qemu_convert, write_disk_image
from dvcrimage import check_image, skopeo_copy
from registryproc import Registry
from serverproc import Server, background_upload, curl, head_offset, manifest
from waiting import wait_until


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
    proc = background_upload(image, url, "8M")
    dvcr_server.wait_phase("cut", ("Provisioning",))
    wait_until(lambda: head_offset(url) >= 8 * MiB, what="the push to be under way")
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
    procs = [background_upload(p, url) for p, _, url in images]
    assert [p.communicate(timeout=300)[0] for p in procs] == [b"200"] * 8
    for i, (_, sha256, _) in enumerate(images):
        obj = dvcr_server.get(f"many-{i}")
        out = tmp_path / f"copy{i}"
        copied = skopeo_copy(
            f"docker://{obj['status']['target']['registryURL']}", out, "--src-tls-verify=false"
        )
        check_image(out, copied, sha256)


@pytest.fixture(scope="module")
def format_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    base = root / "base.raw"
    write_disk_image(base, 16 * MiB, seed=91)
    qcow2 = qemu_convert(base, "qcow2", root / "disk.qcow2")
    packed = root / "disk.qcow2.xz"
    packed.write_bytes(lzma.compress(qcow2.read_bytes(), preset=0))
    iso = make_iso(root)
    return {"raw": base, "qcow2": qcow2, "qcow2.xz": packed, "iso": iso}


@pytest.mark.parametrize(
    ("kind", "fmt", "virtual"),
    [
        ("raw", "raw", 16 * MiB),
        ("qcow2", "qcow2", 16 * MiB),
        ("qcow2.xz", "qcow2", 16 * MiB),
        ("iso", "iso", None),
    ],
)
def test_formats_into_the_registry(
    dvcr_server: Server,
    format_images: dict[str, Path],
    tmp_path: Path,
    kind: str,
    fmt: str,
    virtual: int | None,
) -> None:
    image = format_images[kind]
    name = "img-" + kind.replace(".", "-")
    dvcr_server.create(manifest(name, storage="ContainerRegistry"))
    code, body = curl("-T", str(image), dvcr_server.upload_url(name))
    assert code == 200, body
    obj = dvcr_server.get(name)
    out = tmp_path / "copy"
    ref = obj["status"]["target"]["registryURL"]
    copied = skopeo_copy(f"docker://{ref}", out, "--src-tls-verify=false")
    labels = check_image(out, copied, hashlib.sha256(image.read_bytes()).hexdigest())
    assert labels["source-image-format"] == fmt
    assert labels["source-image-size"] == str(image.stat().st_size)
    assert labels["source-image-virtual-size"] == str(virtual or image.stat().st_size)
    assert obj["status"]["cdrom"] is (fmt == "iso")


def test_registry_with_htpasswd(tmp_path: Path) -> None:
    line = subprocess.run(
        ["htpasswd", "-Bbn", "alice", "wonderland"], check=True, capture_output=True, text=True
    ).stdout.strip()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(line + "\n")
    registry = Registry(tmp_path / "registry", htpasswd=htpasswd).start()
    auth = tmp_path / "config.json"
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(3 * MiB))
    try:
        for password, expect in (("wonderland", 200), ("guess", 502)):
            token = base64.b64encode(f"alice:{password}".encode()).decode()
            auth.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
            srv = Server(
                tmp_path / f"data-{password}",
                "--dvcr", registry.host, "--dvcr-auth-config", str(auth),
            ).start()  # fmt: skip
            try:
                srv.create(manifest("private", storage="ContainerRegistry"))
                code, body = curl("-T", str(image), srv.upload_url("private"))
                assert code == expect, body
                if expect != 200:
                    status = srv.get("private")["status"]
                    assert status["phase"] == "Failed"
                    assert "401" in status["conditions"][0]["message"]
            finally:
                srv.stop()
    finally:
        registry.stop()
