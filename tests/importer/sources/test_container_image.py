"""containerDisk images pulled from a real docker-registry, pushed there with skopeo."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from containerdisks import (
    OCI_TAR,
    OCI_TAR_GZIP,
    Entry,
    Layout,
    disk_layer,
    make_qcow2,
    push_direct,
    sha256,
    skopeo_manifest,
    skopeo_push,
    tar_layer,
)
from registryproc import Registry
from testcerts import make_ca, make_server_cert

from importer.errors import InvalidImage, SourceUnreachable
from importer.oci.auth import Credentials
from importer.oci.registry import DOCKER_MANIFEST, OCI_INDEX, RegistryClient
from importer.sources.container_image import DiskFile, open_container_image

MiB = 1 << 20
OCI_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def _require(binary: str, package: str) -> None:
    if not shutil.which(binary) and not Path(binary).exists():
        pytest.fail(f"{binary} is missing: apt-get install -y {package}")


@pytest.fixture
def qcow2(tmp_path: Path) -> bytes:
    return make_qcow2(tmp_path, seed=1)


async def pull(image: str, **options: object) -> tuple[DiskFile, bytes]:
    async with open_container_image(image, **options) as disk:  # type: ignore[arg-type]
        data = b"".join([chunk async for chunk in disk.chunks])
    return disk, data


def push(tmp_path: Path, layout: Layout, ref: str, image: str, *flags: str) -> None:
    skopeo_push(f"oci:{layout.root}:{ref}", image, *flags, cache_dir=tmp_path / "skopeo-cache")


def blob_file(registry: Registry, digest: str) -> Path:
    [path] = registry.blob_data_files(digest)
    return path


# --- layer formats -----------------------------------------------------------------------


async def test_uncompressed_layer(registry: Registry, qcow2: bytes) -> None:
    async with RegistryClient(registry.url) as client:
        manifest_digest = await push_direct(
            client, "images/plain", "v1", [(disk_layer(qcow2), OCI_TAR)]
        )
    disk, data = await pull(f"{registry.host}/images/plain:v1")
    assert (disk.filename, disk.size) == ("disk.qcow2", len(qcow2))
    assert data == qcow2
    # By digest too, and with the skopeo-style prefix.
    _, data = await pull(f"docker://{registry.host}/images/plain@{manifest_digest}")
    assert data == qcow2


async def test_gzip_layer_pushed_by_skopeo(
    registry: Registry, qcow2: bytes, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "layout")
    layout.tag("v1", layout.image([(disk_layer(qcow2), OCI_TAR)]))
    image = f"{registry.host}/images/gz:v1"
    push(tmp_path, layout, "v1", image)
    assert [layer["mediaType"] for layer in skopeo_manifest(image)["layers"]] == [OCI_TAR_GZIP]
    disk, data = await pull(image)
    assert (disk.filename, data) == ("disk.qcow2", qcow2)


async def test_zstd_layer_pushed_by_skopeo(
    registry: Registry, qcow2: bytes, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "layout")
    layout.tag("v1", layout.image([(disk_layer(qcow2, "image.qcow2"), OCI_TAR)]))
    image = f"{registry.host}/images/zstd:v1"
    push(tmp_path, layout, "v1", image, "--dest-compress-format", "zstd")
    assert [layer["mediaType"] for layer in skopeo_manifest(image)["layers"]] == [OCI_TAR_ZSTD]
    disk, data = await pull(image)
    assert (disk.filename, data) == ("image.qcow2", qcow2)


async def test_docker_schema2_image(registry: Registry, qcow2: bytes, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.tag("v1", layout.image([(disk_layer(qcow2, prefix="./"), OCI_TAR)]))
    image = f"{registry.host}/images/docker:v1"
    push(tmp_path, layout, "v1", image, "--format", "v2s2")
    manifest = skopeo_manifest(image)
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert [layer["mediaType"] for layer in manifest["layers"]] == [DOCKER_GZIP]
    _, data = await pull(image)
    assert data == qcow2


async def test_media_type_and_magic_disagree(registry: Registry, qcow2: bytes) -> None:
    """A layer's magic wins over a media type that names no (or another) compression."""
    zstd_tar = zstandard.ZstdCompressor().compress(disk_layer(qcow2, prefix="/"))
    gzip_tar = gzip.compress(disk_layer(qcow2), compresslevel=1)
    async with RegistryClient(registry.url) as client:
        await push_direct(client, "images/odd", "zstd", [(zstd_tar, OCI_TAR)])
        await push_direct(client, "images/odd", "gzip", [(gzip_tar, "application/x-unknown")])
    for tag in ("zstd", "gzip"):
        _, data = await pull(f"{registry.host}/images/odd:{tag}")
        assert data == qcow2, tag


async def test_long_names_and_tar_flavours(registry: Registry, qcow2: bytes) -> None:
    long_name = "disk/" + "a-very-long-name-" * 12 + ".qcow2"
    async with RegistryClient(registry.url) as client:
        for tag, tar_format in (("gnu", tarfile.GNU_FORMAT), ("pax", tarfile.PAX_FORMAT)):
            layer = tar_layer(Entry("disk"), Entry(long_name, qcow2), tar_format=tar_format)
            await push_direct(client, "images/names", tag, [(layer, OCI_TAR)])
        ustar = tar_layer(Entry("./disk/"), Entry("./disk/d.img", qcow2), tar_format=0)
        await push_direct(client, "images/names", "ustar", [(ustar, OCI_TAR)])
    for tag in ("gnu", "pax"):
        disk, data = await pull(f"{registry.host}/images/names:{tag}")
        assert (disk.filename, data) == (long_name.removeprefix("disk/"), qcow2), tag
    disk, data = await pull(f"{registry.host}/images/names:ustar")
    assert (disk.filename, data) == ("d.img", qcow2)


# --- image structure ---------------------------------------------------------------------


async def test_index_picks_the_platform(registry: Registry, tmp_path: Path) -> None:
    amd64, arm64 = make_qcow2(tmp_path, seed=2), make_qcow2(tmp_path, seed=3)
    layout = Layout(tmp_path / "layout")
    index = layout.index(
        [
            layout.image([(disk_layer(arm64, "arm.qcow2"), OCI_TAR)], arch="arm64"),
            layout.image([(disk_layer(amd64, "amd.qcow2"), OCI_TAR)], arch="amd64"),
        ]
    )
    layout.tag("multi", index)
    image = f"{registry.host}/images/multi:v1"
    push(tmp_path, layout, "multi", image, "--all")
    assert skopeo_manifest(image)["mediaType"] == OCI_INDEX

    disk, data = await pull(image)
    assert (disk.filename, data) == ("amd.qcow2", amd64)
    disk, data = await pull(image, platform="linux/arm64")
    assert (disk.filename, data) == ("arm.qcow2", arm64)
    _, data = await pull(image, platform="linux/arm64/v8")
    assert data == arm64
    with pytest.raises(InvalidImage) as failure:
        await pull(image, platform="linux/s390x")
    assert "no manifest for linux/s390x; it has: linux/arm64, linux/amd64" in str(failure.value)


async def test_docker_manifest_list(registry: Registry, tmp_path: Path) -> None:
    amd64, arm64 = make_qcow2(tmp_path, seed=4), make_qcow2(tmp_path, seed=5)
    layout = Layout(tmp_path / "layout")
    index = layout.index(
        [
            layout.image([(disk_layer(amd64), OCI_TAR)], arch="amd64"),
            layout.image([(disk_layer(arm64), OCI_TAR)], arch="arm64"),
        ]
    )
    layout.tag("multi", index)
    image = f"{registry.host}/images/list:v1"
    push(tmp_path, layout, "multi", image, "--all", "--format", "v2s2")
    manifest = skopeo_manifest(image)
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json"
    _, data = await pull(image)
    assert data == amd64
    _, data = await pull(image, platform="linux/arm64")
    assert data == arm64


async def test_disk_in_a_lower_layer(registry: Registry, qcow2: bytes, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    upper = tar_layer(
        Entry("etc"),
        Entry("etc/motd", b"hello\n" * 5000),
        Entry("disk"),
        Entry("disk/.wh.old.qcow2", b""),  # whiteouts are not the disk
        Entry("disk/link.qcow2", b"", kind=tarfile.SYMTYPE, linkname="disk.qcow2"),
        Entry("disk/hard.qcow2", b"", kind=tarfile.LNKTYPE, linkname="disk/disk.qcow2"),
    )
    base = tar_layer(Entry("usr"), Entry("usr/README", b"base layer\n"))
    layers = [(base, OCI_TAR), (disk_layer(qcow2), OCI_TAR), (upper, OCI_TAR)]
    layout.tag("v1", layout.image(layers))
    image = f"{registry.host}/images/layers:v1"
    push(tmp_path, layout, "v1", image)
    assert len(skopeo_manifest(image)["layers"]) == 3
    disk, data = await pull(image)
    assert (disk.filename, data) == ("disk.qcow2", qcow2)


async def test_the_top_layer_with_a_disk_wins(registry: Registry, tmp_path: Path) -> None:
    old, new = make_qcow2(tmp_path, seed=6), make_qcow2(tmp_path, seed=7)
    async with RegistryClient(registry.url) as client:
        layers = [(disk_layer(old, "old.qcow2"), OCI_TAR), (disk_layer(new, "new.qcow2"), OCI_TAR)]
        await push_direct(client, "images/two", "v1", layers)
    disk, data = await pull(f"{registry.host}/images/two:v1")
    assert (disk.filename, data) == ("new.qcow2", new)


async def test_not_a_container_disk(registry: Registry, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layer = tar_layer(Entry("etc"), Entry("etc/os-release", b"ID=test\n"), Entry("disk"))
    layout.tag("v1", layout.image([(layer, OCI_TAR)]))
    image = f"{registry.host}/images/app:v1"
    push(tmp_path, layout, "v1", image)
    with pytest.raises(InvalidImage) as failure:
        await pull(image)
    assert (
        str(failure.value) == "the image has no file under disk/: it is not a containerDisk image"
    )
    assert failure.value.reason == "InvalidImage"


async def test_two_files_under_disk(registry: Registry, qcow2: bytes) -> None:
    layer = tar_layer(Entry("disk"), Entry("disk/a.qcow2", qcow2), Entry("disk/b.qcow2", b"x"))
    async with RegistryClient(registry.url) as client:
        await push_direct(client, "images/double", "v1", [(layer, OCI_TAR)])
    received = 0
    with pytest.raises(InvalidImage) as failure:
        async with open_container_image(f"{registry.host}/images/double:v1") as disk:
            async for chunk in disk.chunks:
                received += len(chunk)
    assert "more than one file under disk/: disk/a.qcow2 and disk/b.qcow2" in str(failure.value)
    assert received == len(qcow2)  # the error comes before the stream ends


async def test_missing_tag_and_repository(registry: Registry, qcow2: bytes) -> None:
    async with RegistryClient(registry.url) as client:
        await push_direct(client, "images/here", "v1", [(disk_layer(qcow2), OCI_TAR)])
    for image, answer in (
        ("images/here:v2", "404 MANIFEST_UNKNOWN"),
        ("images/nowhere:v1", "404 MANIFEST_UNKNOWN"),
    ):
        with pytest.raises(SourceUnreachable) as failure:
            await pull(f"{registry.host}/{image}")
        assert answer in str(failure.value), str(failure.value)
        assert failure.value.reason == "SourceUnreachable"
    with pytest.raises(SourceUnreachable, match="is not an image reference"):
        await pull(f"{registry.host}/Images/Upper:v1")


async def test_leaving_early_releases_everything(registry: Registry, qcow2: bytes) -> None:
    async with RegistryClient(registry.url) as client:
        await push_direct(client, "images/early", "v1", [(disk_layer(qcow2), OCI_TAR)])
    image = f"{registry.host}/images/early:v1"
    async with asyncio.timeout(20):
        async with open_container_image(image) as disk:
            pass  # not read at all
        async with open_container_image(image) as disk:
            async for _ in disk.chunks:
                break
        with pytest.raises(RuntimeError, match="consumer failed"):
            async with open_container_image(image) as disk:
                await anext(disk.chunks)
                raise RuntimeError("consumer failed")


# --- integrity ---------------------------------------------------------------------------


async def test_corrupted_layer_blob_fails_before_the_end(registry: Registry, qcow2: bytes) -> None:
    layer = disk_layer(qcow2)
    async with RegistryClient(registry.url) as client:
        await push_direct(client, "images/rot", "v1", [(layer, OCI_TAR)])
    path = blob_file(registry, sha256(layer))
    with open(path, "r+b") as f:  # one bit of the disk's data, as storage rot would
        f.seek(3 * MiB)
        byte = f.read(1)
        f.seek(3 * MiB)
        f.write(bytes([byte[0] ^ 0x01]))
    received = 0
    with pytest.raises(InvalidImage) as failure:
        async with open_container_image(f"{registry.host}/images/rot:v1") as disk:
            async for chunk in disk.chunks:
                received += len(chunk)
    assert received == len(qcow2)
    message = str(failure.value)
    assert f"the layer {sha256(layer)} does not match its digest" in message


async def test_truncated_layer_blob(registry: Registry, qcow2: bytes) -> None:
    layer = gzip.compress(disk_layer(qcow2), compresslevel=1)
    async with RegistryClient(registry.url) as client:
        await push_direct(client, "images/short", "v1", [(layer, OCI_TAR_GZIP)])
    path = blob_file(registry, sha256(layer))
    with open(path, "r+b") as f:
        f.truncate(len(layer) // 2)
    with pytest.raises(InvalidImage) as failure:
        await pull(f"{registry.host}/images/short:v1")
    assert f"the layer {sha256(layer)} ended after {len(layer) // 2} of the {len(layer)}" in (
        str(failure.value)
    )


async def test_a_digest_reference_is_checked(registry: Registry, qcow2: bytes) -> None:
    async with RegistryClient(registry.url) as client:
        await push_direct(client, "images/pinned", "v1", [(disk_layer(qcow2), OCI_TAR)])
    wrong = "sha256:" + hashlib.sha256(b"another manifest").hexdigest()
    with pytest.raises(SourceUnreachable) as failure:
        await pull(f"{registry.host}/images/pinned@{wrong}")
    assert "404" in str(failure.value)


# --- auth, TLS, scheme ----------------------------------------------------------------------


@pytest.fixture
def htpasswd_registry(tmp_path: Path) -> Iterator[Registry]:
    _require("htpasswd", "apache2-utils")
    line = subprocess.run(
        ["htpasswd", "-Bbn", "alice", "wonderland"], check=True, capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / "htpasswd").write_text(line + "\n")
    running = Registry(tmp_path / "auth-registry", htpasswd=tmp_path / "htpasswd").start()
    try:
        yield running
    finally:
        running.stop()


async def test_htpasswd_registry(htpasswd_registry: Registry, qcow2: bytes) -> None:
    alice = Credentials(username="alice", password="wonderland")
    async with RegistryClient(htpasswd_registry.url, credentials=alice) as client:
        await push_direct(client, "images/private", "v1", [(disk_layer(qcow2), OCI_TAR)])
    image = f"{htpasswd_registry.host}/images/private:v1"
    _, data = await pull(image, credentials=alice)
    assert data == qcow2
    for credentials in (Credentials(username="alice", password="wrong"), None):
        with pytest.raises(SourceUnreachable) as failure:
            await pull(image, credentials=credentials)
        message = str(failure.value)
        assert "401 UNAUTHORIZED" in message, message
        assert message.startswith("getting the manifest of images/private:v1: ")


async def test_tls_registry_with_the_test_ca(tmp_path: Path, qcow2: bytes) -> None:
    ca = make_ca()
    server = make_server_cert(ca)
    (tmp_path / "server.crt").write_bytes(server.cert_pem)
    (tmp_path / "server.key").write_bytes(server.key_pem)
    registry = Registry(
        tmp_path / "tls-registry", tls=(tmp_path / "server.crt", tmp_path / "server.key")
    ).start()
    try:
        async with RegistryClient(registry.url, ca_bundle=ca.cert_pem) as client:
            await push_direct(client, "images/tls", "v1", [(disk_layer(qcow2), OCI_TAR)])
        image = f"{registry.host}/images/tls:v1"
        _, data = await pull(image, ca_bundle=ca.cert_pem)
        assert data == qcow2
        _, data = await pull(image, insecure=True)
        assert data == qcow2
        with pytest.raises(SourceUnreachable) as failure:
            await pull(image)
        assert "certificate verify failed" in str(failure.value)
    finally:
        registry.stop()


async def test_scheme_of_the_image_name(registry: Registry, qcow2: bytes) -> None:
    """`127.0.0.1:PORT/...` falls back to plain HTTP (loopback); `http://` is used as is;
    `https://` is not downgraded."""
    async with RegistryClient(registry.url) as client:
        await push_direct(client, "images/scheme", "v1", [(disk_layer(qcow2), OCI_TAR)])
    for image in (f"{registry.host}/images/scheme:v1", f"http://{registry.host}/images/scheme:v1"):
        _, data = await pull(image)
        assert data == qcow2, image
    with pytest.raises(SourceUnreachable) as failure:
        await pull(f"https://{registry.host}/images/scheme:v1")
    assert "TLS handshake" in str(failure.value)


async def test_the_loop_stays_free_while_decompressing(registry: Registry, tmp_path: Path) -> None:
    """A highly compressible disk inflates a lot per network read: that work runs in
    worker threads, so the loop keeps ticking."""
    raw = bytes(256 * MiB)
    layer = zstandard.ZstdCompressor(level=3).compress(disk_layer(raw, "zeros.raw"))
    async with RegistryClient(registry.url) as client:
        await push_direct(client, "images/zeros", "v1", [(layer, OCI_TAR_ZSTD)])
    del raw
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.005)  # on purpose: a tick, whose lateness is measured
            now = loop.time()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    total = 0
    try:
        async with open_container_image(f"{registry.host}/images/zeros:v1") as disk:
            async for chunk in disk.chunks:
                assert len(chunk) <= MiB
                total += len(chunk)
    finally:
        stop.set()
        await tick
    assert total == disk.size == 256 * MiB
    assert max(gaps) < 0.5, max(gaps)


async def test_a_blob_missing_from_the_registry(registry: Registry, qcow2: bytes) -> None:
    layer = disk_layer(qcow2)
    async with RegistryClient(registry.url) as client:
        await push_direct(client, "images/gone", "v1", [(layer, OCI_TAR)])
    registry.layer_link("images/gone", sha256(layer)).unlink()
    with pytest.raises(SourceUnreachable) as failure:
        await pull(f"{registry.host}/images/gone:v1")
    assert str(failure.value) == (
        f"pulling blob {sha256(layer)} from images/gone: 404 BLOB_UNKNOWN: blob unknown to registry"
    )
