"""ContainerRegistry storage on the embedded OCI layout, read back with skopeo."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from diskimages import MiB, write_disk_image
from dvcrimage import check_image, skopeo_copy
from serverproc import Server, curl, manifest


def skopeo_copy_image(obj: dict, out: Path) -> dict:
    ref = obj["status"]["target"]["registryURL"]
    assert ref.startswith("oci:")
    return skopeo_copy(ref, out)


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
    copied = skopeo_copy_image(obj, out)
    labels = check_image(out, copied, sha256)
    assert int(status["size"]["storedBytes"]) == copied["layers"][0]["size"]
    assert labels == {
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
    skopeo_copy_image(second, tmp_path / "copy")  # the shared layer is still there
    server.call("DELETE", server.images_path(name="second"))
    assert layout_refs(server) == []
    assert blob_names(server) == set()
