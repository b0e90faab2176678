"""Uploads of real qemu-img images: converted for PVC storage, validated for DVCR."""

from __future__ import annotations

import hashlib
import json
import lzma
import subprocess
import sys
from pathlib import Path

import pytest
from diskimages import MiB, make_iso, qemu_convert, write_disk_image
from dvcrimage import check_image, skopeo_copy
from serverproc import Server, curl, manifest


@pytest.fixture(scope="module")
def base_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "base.raw"
    write_disk_image(path, 48 * MiB, seed=71)
    return path


def virtual_size(image: Path, fmt: str) -> int:
    info = subprocess.run(
        ["qemu-img", "info", "-f", fmt, "--output=json", str(image)],
        check=True,
        capture_output=True,
    ).stdout
    return json.loads(info)["virtual-size"]


def identical(raw: Path, image: Path, fmt: str) -> bool:
    done = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(image)],
        capture_output=True,
        text=True,
    )
    return done.returncode == 0


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("qcow2", ()),
        ("qcow2", ("-c",)),
        ("vmdk", ("-o", "subformat=streamOptimized")),
        ("vpc", ()),
        ("vhdx", ()),
        ("vdi", ()),
    ],
)
def test_formats_are_converted_for_pvc(
    server: Server, base_raw: Path, tmp_path: Path, fmt: str, options: tuple[str, ...]
) -> None:
    image = qemu_convert(base_raw, fmt, tmp_path / f"disk.{fmt}", *options)
    name = f"conv-{fmt}"
    server.create(manifest(name))
    code, body = curl("-T", str(image), server.upload_url(name))
    assert code == 200, body
    status = server.get(name)["status"]
    assert status["format"] == {"vpc": "vhd"}.get(fmt, fmt)
    disk = server.claim_dir(name) / "disk.img"
    assert disk.stat().st_size == int(status["size"]["unpackedBytes"])
    assert disk.stat().st_size == virtual_size(image, fmt)
    assert identical(disk, image, fmt)
    assert int(status["size"]["storedBytes"]) < disk.stat().st_size  # holes stayed holes


def test_xz_compressed_qcow2_for_pvc(server: Server, base_raw: Path, tmp_path: Path) -> None:
    image = qemu_convert(base_raw, "qcow2", tmp_path / "disk.qcow2")
    packed = tmp_path / "disk.qcow2.xz"
    packed.write_bytes(lzma.compress(image.read_bytes(), preset=0))
    server.create(manifest("packed"))
    code, body = curl("-T", str(packed), server.upload_url("packed"))
    assert code == 200, body
    status = server.get("packed")["status"]
    assert status["format"] == "qcow2"
    assert identical(server.claim_dir("packed") / "disk.img", image, "qcow2")


def test_iso_is_a_cdrom(server: Server, tmp_path: Path) -> None:
    iso = make_iso(tmp_path)
    server.create(manifest("installer"))
    assert curl("-T", str(iso), server.upload_url("installer"))[0] == 200
    status = server.get("installer")["status"]
    assert status["format"] == "iso"
    assert status["cdrom"] is True
    assert (server.claim_dir("installer") / "disk.img").read_bytes() == iso.read_bytes()
    table = subprocess.run(
        [sys.executable, "-m", "uploader.cli", "--server", server.url, "get", "vi", "installer"],
        capture_output=True,
        text=True,
    ).stdout
    assert table.splitlines()[1].split()[:3] == ["installer", "Ready", "true"]


@pytest.mark.parametrize("storage", ["PersistentVolumeClaim", "ContainerRegistry"])
def test_unsafe_image_is_refused(
    server: Server, base_raw: Path, tmp_path: Path, storage: str
) -> None:
    image = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", str(base_raw), str(image)],
        check=True,
        capture_output=True,
    )
    server.create(manifest("overlay", storage=storage))
    code, body = curl("-T", str(image), server.upload_url("overlay"))
    assert code == 422
    assert body["reason"] == "InvalidImage"
    assert "backing file" in body["message"]
    status = server.get("overlay")["status"]
    assert status["phase"] == "Failed"
    assert status["conditions"][0]["reason"] == "InvalidImage"
    claim = server.claim_dir("overlay")
    assert not claim.exists() or list(claim.iterdir()) == []
    index = json.loads((server.data_dir / "dvcr" / "index.json").read_text())
    assert index["manifests"] == []
    # The server keeps serving: a good upload right after.
    good = qemu_convert(base_raw, "qcow2", tmp_path / "good.qcow2")
    server.create(manifest("good", storage=storage))
    assert curl("-T", str(good), server.upload_url("good"))[0] == 200


def test_qcow2_stays_qcow2_in_dvcr(server: Server, base_raw: Path, tmp_path: Path) -> None:
    image = qemu_convert(base_raw, "qcow2", tmp_path / "disk.qcow2")
    packed = tmp_path / "disk.qcow2.xz"
    packed.write_bytes(lzma.compress(image.read_bytes(), preset=0))
    server.create(manifest("kept", storage="ContainerRegistry"))
    assert curl("-T", str(packed), server.upload_url("kept"))[0] == 200
    obj = server.get("kept")
    out = tmp_path / "copy"
    copied = skopeo_copy(obj["status"]["target"]["registryURL"], out)
    labels = check_image(out, copied, hashlib.sha256(packed.read_bytes()).hexdigest())
    assert labels["source-image-format"] == "qcow2"
    assert labels["source-image-virtual-size"] == str(48 * MiB)
    assert labels["source-image-size"] == str(packed.stat().st_size)
    assert obj["status"]["size"]["unpackedBytes"] == str(48 * MiB)


def test_image_over_the_size_limit(tmp_path: Path, base_raw: Path) -> None:
    srv = Server(tmp_path / "data", "--max-image-size", "32Mi").start()
    try:
        image = qemu_convert(base_raw, "qcow2", tmp_path / "disk.qcow2")  # 48 MiB virtual
        assert image.stat().st_size < 32 * MiB
        srv.create(manifest("toobig"))
        code, body = curl("-T", str(image), srv.upload_url("toobig"))
        assert code == 413
        assert body["reason"] == "ImageTooLarge"
        assert srv.get("toobig")["status"]["conditions"][0]["reason"] == "ImageTooLarge"
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "base.raw"
    write_disk_image(path, 12 * MiB, seed=72)
    return path


WRAPPERS = {
    "gz": ["gzip", "-1", "-c"],
    "xz": ["xz", "-0", "-T1", "-c"],
    "zst": ["zstd", "-1", "-q", "-c"],
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vhdx", "vdi", "raw"])
def test_compressed_images_for_pvc(
    server: Server, small_raw: Path, tmp_path: Path, fmt: str, wrapper: str
) -> None:
    image = qemu_convert(small_raw, fmt, tmp_path / f"disk.{fmt}")
    packed = tmp_path / f"disk.{fmt}.{wrapper}"
    with open(packed, "wb") as out:
        subprocess.run([*WRAPPERS[wrapper], str(image)], stdout=out, check=True)
    name = f"{fmt}-{wrapper}"
    server.create(manifest(name))
    code, body = curl("-T", str(packed), server.upload_url(name))
    assert code == 200, body
    status = server.get(name)["status"]
    assert status["format"] == {"vpc": "vhd"}.get(fmt, fmt)
    assert status["size"]["unpackedBytes"] == str(virtual_size(image, fmt))
    assert status["checksum"]["sha256"] == hashlib.sha256(packed.read_bytes()).hexdigest()
    assert identical(server.claim_dir(name) / "disk.img", image, fmt)
