"""DVCR images copied without copying their bytes, and read back, in both stores: the
embedded OCI layout and a real docker-registry."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nginxproc import Nginx
from registryproc import Registry

from importer.errors import InvalidImage, SourceUnreachable
from importer.oci.image import LAYER_TYPE, Descriptor, config_blob, image_labels
from importer.oci.layer import LayerLane
from importer.oci.layout import OciLayout
from importer.oci.registry import RegistryClient
from importer.oci.registry_store import RegistryStore
from importer.oci.store import ImageStore

MiB = 1 << 20


def _feed(lane: LayerLane, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(data), MiB):
        lane.update(view[start : start + MiB])
    lane.finish()


async def store_image(
    store: ImageStore, repo: str, tag: str, data: bytes, filename: str = "disk.qcow2"
) -> Descriptor:
    """An image written the way the pipeline writes one; returns the layer's descriptor."""
    upload = await store.begin_layer(repo)
    lane = LayerLane(upload, filename, len(data))
    await asyncio.to_thread(_feed, lane, data)  # a lane writes from its own thread
    layer = Descriptor(LAYER_TYPE, lane.digest, lane.length)
    labels = image_labels(len(data), len(data), "raw", {})
    await store.publish(repo, tag, upload, layer, config_blob(layer.digest, labels))
    return layer


async def read_disk(store: ImageStore, repo: str, tag: str) -> tuple[str, int, bytes]:
    async with store.open_disk(repo, tag) as disk:
        data = b"".join([chunk async for chunk in disk.chunks])
    return disk.filename, disk.size, data


def skopeo_dir(source: str, out: Path) -> dict[str, object]:
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", source, f"dir:{out}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return json.loads((out / "manifest.json").read_text())


def skopeo_digest(image: str) -> str:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{image}"],
        check=True,
        capture_output=True,
        timeout=60,
        text=True,
    ).stdout
    return json.loads(out)["Digest"]


# --- the OCI layout ----------------------------------------------------------------------


async def test_layout_copy_shares_blobs_and_outlives_its_source(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "dvcr")
    data = os.urandom(3 * MiB + 5)
    await store_image(layout, "vi/ns/src", "uid-1", data)
    blobs_before = sorted(p.name for p in layout.blobs.iterdir())
    assert len(blobs_before) == 3  # layer, config, manifest

    await layout.copy("vi/ns/src", "uid-1", "vi/ns/dst", "uid-2")
    assert sorted(p.name for p in layout.blobs.iterdir()) == blobs_before
    index = json.loads(layout.index_path.read_text())
    assert len({entry["digest"] for entry in index["manifests"]}) == 1
    assert sorted(layout.refs()) == ["vi/ns/dst:uid-2", "vi/ns/src:uid-1"]

    await layout.remove("vi/ns/src", "uid-1")
    assert layout.refs() == ["vi/ns/dst:uid-2"]
    assert sorted(p.name for p in layout.blobs.iterdir()) == blobs_before
    assert await read_disk(layout, "vi/ns/dst", "uid-2") == ("disk.qcow2", len(data), data)
    if shutil.which("skopeo"):
        skopeo_dir(layout.reference("vi/ns/dst", "uid-2"), tmp_path / "out")

    await layout.remove("vi/ns/dst", "uid-2")
    assert list(layout.blobs.iterdir()) == []


async def test_layout_copy_over_an_image_collects_the_old_one(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "dvcr")
    keep, old = os.urandom(MiB), os.urandom(MiB)
    kept_layer = await store_image(layout, "vi/ns/a", "1", keep)
    old_layer = await store_image(layout, "vi/ns/b", "1", old)
    await layout.copy("vi/ns/a", "1", "vi/ns/b", "1")
    assert layout.blob_path(kept_layer.digest).exists()
    assert not layout.blob_path(old_layer.digest).exists()
    assert (await read_disk(layout, "vi/ns/b", "1"))[2] == keep
    await layout.copy("vi/ns/a", "1", "vi/ns/a", "1")  # onto itself: nothing changes
    assert sorted(layout.refs()) == ["vi/ns/a:1", "vi/ns/b:1"]


async def test_layout_missing_images(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "dvcr")
    with pytest.raises(SourceUnreachable, match="DVCR has no image vi/ns/none:1"):
        await layout.copy("vi/ns/none", "1", "vi/ns/dst", "1")
    with pytest.raises(SourceUnreachable, match="DVCR has no image vi/ns/none:1"):
        await read_disk(layout, "vi/ns/none", "1")
    assert layout.refs() == []


async def test_layout_open_disk_checks_the_blob(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "dvcr")
    data = os.urandom(2 * MiB)
    layer = await store_image(layout, "vi/ns/rot", "1", data, filename="d.img")
    assert await read_disk(layout, "vi/ns/rot", "1") == ("d.img", len(data), data)
    path = layout.blob_path(layer.digest)
    blob = bytearray(path.read_bytes())
    blob[MiB] ^= 0x80
    path.write_bytes(bytes(blob))
    with pytest.raises(InvalidImage, match="does not match its digest"):
        await read_disk(layout, "vi/ns/rot", "1")
    path.unlink()
    with pytest.raises(SourceUnreachable, match="is missing"):
        await read_disk(layout, "vi/ns/rot", "1")


async def test_layout_reads_many_disks_at_once(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "dvcr")
    images = {f"img{i}": os.urandom(MiB + i) for i in range(6)}
    for name, data in images.items():
        await store_image(layout, f"vi/ns/{name}", "1", data)
    results = await asyncio.gather(*(read_disk(layout, f"vi/ns/{n}", "1") for n in images))
    assert [data for _, _, data in results] == list(images.values())


# --- a registry --------------------------------------------------------------------------


async def test_registry_copy_mounts_the_layer(registry: Registry, tmp_path: Path) -> None:
    data = os.urandom(4 * MiB + 3)
    store = RegistryStore(RegistryClient(registry.host))  # no scheme: plain HTTP on loopback
    try:
        layer = await store_image(store, "vi/ns/src", "uid-1", data)
        await store.copy("vi/ns/src", "uid-1", "cvi/dst", "uid-2")
        assert len(registry.blob_data_files(layer.digest)) == 1
        all_data = list((registry.storage / "docker/registry/v2/blobs/sha256").glob("*/*/data"))
        assert len(all_data) == 3  # layer, config, manifest: nothing twice
        assert registry.layer_link("cvi/dst", layer.digest).exists()
        assert registry.upload_data("cvi/dst") == []

        src_digest = skopeo_digest(f"{registry.host}/vi/ns/src:uid-1")
        assert skopeo_digest(f"{registry.host}/cvi/dst:uid-2") == src_digest
        src_copy = skopeo_dir(f"docker://{registry.host}/vi/ns/src:uid-1", tmp_path / "src")
        dst_copy = skopeo_dir(f"docker://{registry.host}/cvi/dst:uid-2", tmp_path / "dst")
        assert src_copy == dst_copy
        for name in os.listdir(tmp_path / "src"):
            assert (tmp_path / "src" / name).read_bytes() == (tmp_path / "dst" / name).read_bytes()

        assert await read_disk(store, "cvi/dst", "uid-2") == ("disk.qcow2", len(data), data)
        await store.remove("vi/ns/src", "uid-1")
        assert await read_disk(store, "cvi/dst", "uid-2") == ("disk.qcow2", len(data), data)
        with pytest.raises(SourceUnreachable, match="MANIFEST_UNKNOWN"):
            await read_disk(store, "vi/ns/src", "uid-1")
    finally:
        await store.close()


async def test_registry_copy_of_a_missing_image(registry: Registry) -> None:
    store = RegistryStore(RegistryClient(registry.url))
    try:
        with pytest.raises(SourceUnreachable) as failure:
            await store.copy("vi/ns/none", "1", "vi/ns/dst", "1")
        assert "DVCR has no image vi/ns/none:1 to copy" in str(failure.value)
        assert "404 MANIFEST_UNKNOWN" in str(failure.value)
        assert await store.client.list_tags("vi/ns/dst") == []
    finally:
        await store.close()


async def test_registry_open_disk_is_exact(registry: Registry) -> None:
    store = RegistryStore(RegistryClient(registry.url))
    try:
        for size, name in ((0, "empty.img"), (511, "odd.raw"), (5 * MiB + 1, "disk.qcow2")):
            data = os.urandom(size)
            await store_image(store, f"vi/ns/{name.split('.')[0]}", "t", data, filename=name)
            got = await read_disk(store, f"vi/ns/{name.split('.')[0]}", "t")
            assert got == (name, size, data)
    finally:
        await store.close()


# The server block of an nginx in front of the registry.
NO_MOUNT_PROXY = """\
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        location /v2/ {
            # A registry that does not mount: the query is dropped, a plain upload opens.
            if ($arg_mount) {
                rewrite ^(.*)$ $1? break;
            }
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
        }
"""


@pytest.fixture
def no_mount_proxy(tmp_path: Path, registry: Registry) -> Iterator[str]:
    """nginx in front of the registry, refusing cross-repository mounts; its host:port."""
    server = NO_MOUNT_PROXY.replace("{upstream}", registry.host)
    proxy = Nginx(tmp_path / "proxy", server=server).start()
    try:
        yield f"127.0.0.1:{proxy.port}"
    finally:
        proxy.stop()


async def test_registry_copy_streams_when_a_mount_is_refused(
    registry: Registry, no_mount_proxy: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(3 * MiB)
    store = RegistryStore(RegistryClient(f"http://{no_mount_proxy}"))
    try:
        layer = await store_image(store, "vi/ns/src", "1", data)
        with caplog.at_level(logging.WARNING, logger="importer.oci.registry_store"):
            await store.copy("vi/ns/src", "1", "vi/ns/dst", "1")
        refused = [r.getMessage() for r in caplog.records if "refused to mount" in r.getMessage()]
        assert len(refused) == 2  # the layer and the config
        assert any(layer.digest in message for message in refused)
        assert registry.layer_link("vi/ns/dst", layer.digest).exists()
        assert registry.upload_data("vi/ns/dst") == []
        assert await read_disk(store, "vi/ns/dst", "1") == ("disk.qcow2", len(data), data)
        assert skopeo_digest(f"{registry.host}/vi/ns/dst:1") == skopeo_digest(
            f"{registry.host}/vi/ns/src:1"
        )
    finally:
        await store.close()
