"""The layer reader on hand-made layers in files: tar details, compression, checks."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from importer.errors import InvalidImage
from importer.formats.tar import BLOCK, TarEntries
from importer.oci.disklayer import NO_DISK, FileSource, disk_from_layers
from importer.oci.image import Descriptor

MiB = 1 << 20
TAR = "application/vnd.oci.image.layer.v1.tar"


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None], tar_format: int = 1) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def with_checksum(header: bytearray) -> bytearray:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return header


async def read_layers(tmp_path: Path, *layers: bytes, media_type: str = TAR) -> tuple[str, bytes]:
    descriptors = []
    for layer in layers:
        digest = "sha256:" + hashlib.sha256(layer).hexdigest()
        (tmp_path / digest[7:]).write_bytes(layer)
        descriptors.append(Descriptor(media_type, digest, len(layer)))

    def open_blob(layer: Descriptor) -> FileSource:
        return FileSource(tmp_path / layer.digest[7:], "test")

    async with disk_from_layers(descriptors, open_blob) as disk:
        data = b"".join([chunk async for chunk in disk.chunks])
    assert len(data) == disk.size
    return disk.filename, data


async def test_base256_size(tmp_path: Path) -> None:
    """Sizes of 8 GiB and more are written in base-256; the same encoding of a small size
    must be read the same way."""
    data = os.urandom(3000)
    layer = bytearray(tar_of(regular("disk/big.raw", data), tar_format=tarfile.GNU_FORMAT))
    header = layer[:BLOCK]
    header[124:136] = b"\x80" + len(data).to_bytes(11, "big")
    layer[:BLOCK] = with_checksum(header)
    assert await read_layers(tmp_path, bytes(layer)) == ("big.raw", data)


async def test_pax_size_and_path_win_over_the_header(tmp_path: Path) -> None:
    data = os.urandom(5000)
    info, _ = regular("disk/short", data)
    info.pax_headers = {"path": "disk/the-real-name.qcow2", "size": str(len(data))}
    layer = tar_of((info, data), tar_format=tarfile.PAX_FORMAT)
    assert await read_layers(tmp_path, layer) == ("the-real-name.qcow2", data)


async def test_ustar_prefix(tmp_path: Path) -> None:
    name = "disk/" + "d" * 120 + "/x.img"  # too long for `name` alone: split into prefix
    data = b"ustar data" * 100
    layer = tar_of(regular(name, data), tar_format=tarfile.USTAR_FORMAT)
    assert layer[345:350] == b"disk/"
    assert await read_layers(tmp_path, layer) == ("x.img", data)


async def test_compression_by_magic_and_media_type(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    layer = tar_of(regular("disk/d.img", data))
    two_members = gzip.compress(layer[: 3 * BLOCK]) + gzip.compress(layer[3 * BLOCK :])
    frames = zstandard.ZstdCompressor().compress(layer[:MiB]) + zstandard.ZstdCompressor(
        level=5
    ).compress(layer[MiB:])
    for blob, media_type in (
        (two_members, TAR + "+gzip"),
        (frames, TAR + "+zstd"),
        (frames, TAR),
        (gzip.compress(layer), "application/vnd.docker.image.rootfs.diff.tar.gzip"),
    ):
        assert await read_layers(tmp_path, blob, media_type=media_type) == ("d.img", data)
    with pytest.raises(InvalidImage, match="is not a valid gzip stream"):
        await read_layers(tmp_path, layer[:100] + b"not gzip", media_type=TAR + "+gzip")


async def test_refusals(tmp_path: Path) -> None:
    data = os.urandom(10000)
    layer = tar_of(regular("disk/d.img", data))
    bad_checksum = bytearray(layer)
    bad_checksum[150] = ord("7") if bad_checksum[150] != ord("7") else ord("6")
    cases = {
        "a header checksum is wrong": bytes(bad_checksum),
        "the tar archive is truncated": layer[: BLOCK + 4000],
        "is stored as a sparse file": _sparse_layer(),
        "too large": _huge_pax_layer(),
        NO_DISK: tar_of(regular("disk", b"a file named disk"), regular("dusk/x", b"x")),
    }
    for complaint, blob in cases.items():
        with pytest.raises(InvalidImage) as failure:
            await read_layers(tmp_path, blob)
        assert complaint in str(failure.value), (complaint, str(failure.value))


def _sparse_layer() -> bytes:
    info, data = regular("disk/sparse.img", b"\0" * BLOCK)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
    return tar_of((info, data), tar_format=tarfile.PAX_FORMAT)


def _huge_pax_layer() -> bytes:
    info, data = regular("disk/x.img", b"x")
    info.pax_headers = {"comment": "c" * (2 * MiB)}
    return tar_of((info, data), tar_format=tarfile.PAX_FORMAT)


def test_tar_entries_are_read_in_order() -> None:
    link = tarfile.TarInfo("disk/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "disk/real"
    layer = tar_of(regular("a", b"1" * 700), (link, None), regular("b", b"22"))
    stream = TarEntries(io.BytesIO(layer).read, "test")
    first = stream.next()
    assert first is not None and (first.name, first.size) == ("a", 700)
    assert stream.read_data(10) == b"1" * 10
    second = stream.next()  # the rest of `a` is skipped
    assert second is not None and (second.type, second.linkname) == (b"2", "disk/real")
    third = stream.next()
    assert third is not None and stream.read_data(100) == b"22" and stream.read_data(1) == b""
    assert stream.next() is None and stream.next() is None
