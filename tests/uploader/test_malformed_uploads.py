"""A corpus of malformed and unsafe images, each uploaded with curl to one server: each is
refused with the right reason, leaves nothing behind, and the server keeps serving."""

from __future__ import annotations

import gzip
import io
import struct
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from diskimages import MiB, write_disk_image
from serverproc import Server, curl, manifest

Mutation = Callable[[bytearray], bytes]


def qemu(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    base = root / "base.raw"
    write_disk_image(base, 8 * MiB, seed=81)
    made = {"base": base}
    for name, fmt, options in [
        ("qcow2", "qcow2", []),
        ("vmdk", "vmdk", []),
        ("vhd", "vpc", []),
        ("vdi", "vdi", []),
        ("vhdx", "vhdx", []),
    ]:
        made[name] = root / f"disk.{name}"
        qemu("convert", "-f", "raw", "-O", fmt, *options, str(base), str(made[name]))
    made["backing"] = root / "overlay.qcow2"
    qemu("create", "-f", "qcow2", "-F", "raw", "-b", str(base), str(made["backing"]))
    made["luks"] = root / "secret.qcow2"
    qemu(
        "create", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
        "-o", "encrypt.format=luks,encrypt.key-secret=sec0", str(made["luks"]), "8M",
    )  # fmt: skip
    made["qed"] = root / "disk.qed"
    qemu("create", "-f", "qed", str(made["qed"]), "8M")
    return made


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("srv") / "data", "--max-image-size", "1Gi").start()
    try:
        yield srv
    finally:
        srv.stop()


def be32(offset: int, value: int) -> Mutation:
    def mutate(data: bytearray) -> bytes:
        struct.pack_into(">I", data, offset, value)
        return bytes(data)

    return mutate


def be64(offset: int, value: int) -> Mutation:
    def mutate(data: bytearray) -> bytes:
        struct.pack_into(">Q", data, offset, value)
        return bytes(data)

    return mutate


def cut(fraction: float) -> Mutation:
    return lambda data: bytes(data[: int(len(data) * fraction)])


def first_l1_entry_past_end(data: bytearray) -> bytes:
    (l1_offset,) = struct.unpack_from(">Q", data, 40)
    struct.pack_into(">Q", data, l1_offset, (1 << 80 - 30) | (1 << 63))
    return bytes(data)


def vhd_footer_field(offset: int, value: int) -> Mutation:
    """Changes a field of the copy of the footer at the start and fixes its checksum."""

    def mutate(data: bytearray) -> bytes:
        struct.pack_into(">I", data, offset, value)
        struct.pack_into(">I", data, 64, 0)
        struct.pack_into(">I", data, 64, ~sum(data[:512]) & 0xFFFFFFFF)
        return bytes(data)

    return mutate


def vdi_type(value: int) -> Mutation:
    def mutate(data: bytearray) -> bytes:
        struct.pack_into("<I", data, 0x4C, value)
        return bytes(data)

    return mutate


def vmdk_capacity(data: bytearray) -> bytes:
    struct.pack_into("<Q", data, 12, 1 << 50)  # sectors: 512 PiB
    return bytes(data)


def garbled_gzip(data: bytearray) -> bytes:
    packed = bytearray(gzip.compress(bytes(data), compresslevel=1))
    for i in range(len(packed) // 2, len(packed) // 2 + 64):
        packed[i] ^= 0x5A
    return bytes(packed)


def two_file_tar(data: bytearray) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in ("a.qcow2", "b.qcow2"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(bytes(data)))
    return out.getvalue()


def descriptor_file(_: bytearray) -> bytes:
    return (
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        b'createType="monolithicFlat"\nRW 16384 FLAT "disk-flat.vmdk" 0\n'
    )


def keep(data: bytearray) -> bytes:
    return bytes(data)


INVALID, UNSUPPORTED, TOO_LARGE = "InvalidImage", "UnsupportedFormat", "ImageTooLarge"

CORPUS: list[tuple[str, str, Mutation, str]] = [
    ("qcow2-truncated-half", "qcow2", cut(0.5), INVALID),
    ("qcow2-header-only", "qcow2", cut(0.0015), INVALID),
    ("qcow2-version-1", "qcow2", be32(4, 1), UNSUPPORTED),
    ("qcow2-cluster-bits-8", "qcow2", be32(20, 8), INVALID),
    ("qcow2-cluster-bits-22", "qcow2", be32(20, 22), INVALID),
    ("qcow2-aes-encrypted", "qcow2", be32(32, 1), INVALID),
    ("qcow2-corrupt-bit", "qcow2", be64(72, 2), INVALID),
    ("qcow2-unknown-incompatible-bit", "qcow2", be64(72, 1 << 40), INVALID),
    ("qcow2-external-data-file-bit", "qcow2", be64(72, 4), INVALID),
    ("qcow2-size-1-eib", "qcow2", be64(24, 1 << 60), TOO_LARGE),
    ("qcow2-l1-past-the-end", "qcow2", be64(40, 1 << 40), INVALID),
    ("qcow2-l1-huge", "qcow2", be32(36, 1 << 30), INVALID),
    ("qcow2-l1-entry-past-the-end", "qcow2", first_l1_entry_past_end, INVALID),
    ("qcow2-backing-file", "backing", keep, INVALID),
    ("qcow2-luks", "luks", keep, INVALID),
    ("qed", "qed", keep, UNSUPPORTED),
    ("vmdk-truncated", "vmdk", cut(0.6), INVALID),
    ("vmdk-descriptor-file", "vmdk", descriptor_file, INVALID),
    ("vmdk-capacity-512-pib", "vmdk", vmdk_capacity, TOO_LARGE),
    ("vhd-truncated", "vhd", cut(0.7), INVALID),
    ("vhd-differencing", "vhd", vhd_footer_field(60, 4), INVALID),
    ("vdi-differencing", "vdi", vdi_type(4), INVALID),
    ("vdi-truncated", "vdi", cut(0.5), INVALID),
    ("vhdx-truncated", "vhdx", cut(0.4), INVALID),
    ("gzip-garbled", "qcow2", garbled_gzip, INVALID),
    ("tar-two-files", "qcow2", two_file_tar, INVALID),
]


@pytest.mark.parametrize(("case", "source", "mutate", "reason"), CORPUS, ids=[c[0] for c in CORPUS])
def test_refused_with_reason_and_nothing_left(
    corpus_server: Server,
    images: dict[str, Path],
    tmp_path: Path,
    case: str,
    source: str,
    mutate: Mutation,
    reason: str,
) -> None:
    bad = tmp_path / case
    bad.write_bytes(mutate(bytearray(images[source].read_bytes())))
    corpus_server.create(manifest(case))
    code, body = curl("-T", str(bad), corpus_server.upload_url(case))

    assert code == (413 if reason == TOO_LARGE else 422), body
    assert body["reason"] == reason, body
    assert len(body["message"]) > 20
    status = corpus_server.get(case)["status"]
    assert status["phase"] == "Failed"
    assert status["conditions"][0]["reason"] == reason
    assert status["conditions"][0]["message"] == body["message"]
    claim = corpus_server.claim_dir(case)
    assert not claim.exists() or list(claim.iterdir()) == []
    # ...and a normal upload right after is served.
    corpus_server.create(manifest(f"{case}-ok"))
    code, _ = curl("-T", str(images["qcow2"]), corpus_server.upload_url(f"{case}-ok"))
    assert code == 200


def test_compression_bomb_stops_at_the_limit(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", "--max-image-size", "64Mi").start()
    try:
        bomb = tmp_path / "bomb.raw.gz"
        with gzip.open(bomb, "wb", compresslevel=9) as f:
            zeros = bytes(16 * MiB)
            for _ in range(64):  # 1 GiB of zeros in about 1 MiB
                f.write(zeros)
        assert bomb.stat().st_size < 2 * MiB
        srv.create(manifest("bomb"))
        code, body = curl("-T", str(bomb), srv.upload_url("bomb"))
        assert code == 413
        assert body["reason"] == TOO_LARGE
        assert srv.peak_rss() < 200 * MiB
    finally:
        srv.stop()
