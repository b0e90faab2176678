"""ContainerRegistry storage on the embedded OCI layout, read back with skopeo."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
from pathlib import Path

from diskimages import MiB, write_disk_image
from serverproc import Server, curl, manifest


def skopeo_copy(server: Server, obj: dict, out: Path) -> dict:
    ref = obj["status"]["target"]["registryURL"]
    assert ref.startswith("oci:")
    subprocess.run(["skopeo", "copy", ref, f"dir:{out}"], check=True, capture_output=True)
    return json.loads((out / "manifest.json").read_text())


def test_upload_into_the_oci_layout(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "cirros.img"
    sha256, _ = write_disk_image(image, 24 * MiB, seed=41)
    md5 = hashlib.md5(image.read_bytes()).hexdigest()
    server.create(manifest("some-image", storage="ContainerRegistry", checksum={"md5": md5}))
    code, body = curl("-T", str(image), server.upload_url("some-image"))
    assert code == 200, body
    obj = server.get("some-image")
    status = obj["status"]
    uid = obj["metadata"]["uid"]
    assert status["phase"] == "Ready"
    assert status["checksum"] == {"sha256": sha256, "md5": md5}
    assert status["target"]["registryURL"].endswith(f":vi/default/some-image:{uid}")

    out = tmp_path / "copy"
    copied = skopeo_copy(server, obj, out)
    layer_digest = copied["layers"][0]["digest"]
    assert copied["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    layer = out / layer_digest.removeprefix("sha256:")
    assert "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest() == layer_digest
    assert int(status["size"]["storedBytes"]) == layer.stat().st_size
    with tarfile.open(layer) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["disk", "disk/disk.img"]
        assert members[0].isdir()
        disk = members[1]
        assert disk.isfile()
        assert (disk.uid, disk.gid, disk.mode) == (107, 107, 0o444)
        extracted = tar.extractfile(disk)
        assert extracted is not None
        assert hashlib.sha256(extracted.read()).hexdigest() == sha256

    config = json.loads((out / copied["config"]["digest"].removeprefix("sha256:")).read_text())
    assert config["rootfs"]["diff_ids"] == [layer_digest]
    assert config["config"]["Labels"] == {
        "source-image-size": str(24 * MiB),
        "source-image-virtual-size": str(24 * MiB),
        "source-image-format": "raw",
        "checksum-md5": md5,
        "checksum-sha256": sha256,
    }


def layout_refs(server: Server) -> list[str]:
    index = json.loads((server.data_dir / "dvcr" / "index.json").read_text())
    return [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]


def blob_names(server: Server) -> set[str]:
    return {p.name for p in (server.data_dir / "dvcr" / "blobs" / "sha256").iterdir()}


def test_refused_upload_leaves_no_image_in_dvcr(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(4 * MiB))
    server.create(manifest("bad", storage="ContainerRegistry", checksum={"sha256": "2" * 64}))
    code, body = curl("-T", str(image), server.upload_url("bad"))
    assert code == 422
    assert body["reason"] == "BadImageChecksum"
    assert layout_refs(server) == []
    assert blob_names(server) == set()


def test_registry_storage_needs_a_length(server: Server, tmp_path: Path) -> None:
    server.create(manifest("nolen", storage="ContainerRegistry"))
    url = server.upload_url("nolen")
    code, body = curl("-T", "-", url, stdin=os.urandom(MiB))
    assert code == 411
    assert "Content-Length" in body["message"]
    assert server.get("nolen")["status"]["phase"] == "WaitForUserUpload"


def test_delete_removes_the_tag_and_unshared_blobs(server: Server, tmp_path: Path) -> None:
    same = tmp_path / "same.raw"
    same.write_bytes(os.urandom(2 * MiB))
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(2 * MiB))
    for name, image in (("first", same), ("second", same), ("third", other)):
        server.create(manifest(name, storage="ContainerRegistry"))
        assert curl("-T", str(image), server.upload_url(name))[0] == 200
    assert len(layout_refs(server)) == 3
    before = blob_names(server)

    server.call("DELETE", server.images_path(name="third"))
    after_third = blob_names(server)
    assert len(after_third) == len(before) - 3  # its layer, config and manifest
    assert after_third < before

    server.call("DELETE", server.images_path(name="first"))
    second = server.get("second")
    assert layout_refs(server) == [f"vi/default/second:{second['metadata']['uid']}"]
    skopeo_copy(server, second, tmp_path / "copy")  # the shared layer is still there
    server.call("DELETE", server.images_path(name="second"))
    assert layout_refs(server) == []
    assert blob_names(server) == set()
