"""Naming a stream from its first bytes."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import struct
import tarfile

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from qcow2_helpers import MiB, make_base, run

from importer.errors import InvalidImage, TransferError, UnsupportedFormat
from importer.formats.sniff import SNIFF_SIZE, is_tar_header, sniff


def _padded(head: bytes, size: int = SNIFF_SIZE) -> bytes:
    return head + bytes(max(0, size - len(head)))


def _tar_with(content: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("disk.img")
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _vdi() -> bytes:
    head = bytearray(512)
    head[:40] = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    head[0x40:0x44] = b"\x7f\x10\xda\xbe"
    return bytes(head)


def _udf() -> bytes:
    """The volume recognition sequence of a UDF medium (no ISO 9660 descriptor)."""
    data = bytearray(SNIFF_SIZE)
    for k, ident in enumerate([b"BEA01", b"NSR03", b"TEA01"]):
        start = 32768 + 2048 * k
        data[start : start + 7] = b"\x00" + ident + b"\x01"
    return bytes(data)


SAMPLE = random.Random(3).randbytes(4096)

CASES = {
    "qcow2-v2": (b"QFI\xfb\x00\x00\x00\x02" + bytes(100), "qcow2"),
    "qcow2-v3": (b"QFI\xfb\x00\x00\x00\x03" + bytes(100), "qcow2"),
    "vmdk": (b"KDMV\x01\x00\x00\x00" + bytes(100), "vmdk"),
    "vdi": (_vdi(), "vdi"),
    "vhd-dynamic": (b"conectix" + bytes(504), "vhd"),
    "vhdx": (b"vhdxfile" + bytes(504), "vhdx"),
    "gzip": (gzip.compress(SAMPLE), "gzip"),
    "xz": (lzma.compress(SAMPLE), "xz"),
    "zstd": (zstandard.ZstdCompressor().compress(SAMPLE), "zstd"),
    "bzip2": (bz2.compress(SAMPLE), "bzip2"),
    "bzip2-empty": (bz2.compress(b""), "bzip2"),
    "tar": (_tar_with(SAMPLE), "tar"),
    "udf": (_udf(), "iso"),
    "raw-random": (_padded(SAMPLE), "raw"),
    "raw-zeros": (bytes(SNIFF_SIZE), "raw"),
    "raw-mbr": (_padded(bytes(510) + b"\x55\xaa"), "raw"),
}


@pytest.mark.parametrize(("head", "expected"), CASES.values(), ids=list(CASES))
def test_names_the_stream(head: bytes, expected: str) -> None:
    assert sniff(head, final=True) == expected
    if len(head) >= SNIFF_SIZE:
        assert sniff(head, final=False) == expected


@pytest.mark.parametrize(
    ("head", "error", "message"),
    [
        (b"QFI\xfb\x00\x00\x00\x01" + bytes(100), UnsupportedFormat, "version 1"),
        (b"QED\x00" + bytes(100), UnsupportedFormat, "QED"),
        (b"LUKS\xba\xbe\x00\x01" + bytes(100), UnsupportedFormat, "LUKS"),
        (b"COWD\x01\x00\x00\x00" + bytes(100), UnsupportedFormat, "COWD"),
        (b"WithoutFreeSpace" + bytes(100), UnsupportedFormat, "Parallels"),
        (
            b'# Disk DescriptorFile\nversion=1\nRW 2048 SPARSE "disk-s001.vmdk"\n',
            InvalidImage,
            "descriptor",
        ),
    ],
    ids=["qcow-v1", "qed", "luks", "vmdk-cowd", "parallels", "vmdk-descriptor"],
)
def test_refuses(head: bytes, error: type[TransferError], message: str) -> None:
    with pytest.raises(error, match=message):
        sniff(head, final=True)


def test_waits_for_enough_bytes() -> None:
    # Too short to tell anything yet.
    assert sniff(b"QF", final=False) is None
    # Nothing at offset 0: the VDI magic at 0x40, the tar magic at 257 and the ISO/UDF
    # descriptors at 32 KiB are still to come.
    assert sniff(bytes(0x20), final=False) is None
    assert sniff(bytes(300), final=False) is None
    assert sniff(bytes(40_000), final=False) is None
    assert sniff(bytes(SNIFF_SIZE), final=False) == "raw"
    # Magic at the start decides at once.
    assert sniff(b"QFI\xfb\x00\x00\x00\x03" + bytes(8), final=False) == "qcow2"
    # At the end of the stream, whatever has been seen decides.
    assert sniff(b"", final=True) == "raw"
    assert sniff(b"QF", final=True) == "raw"
    assert sniff(bytes(40_000), final=True) == "raw"


def test_bzip2_needs_a_block_magic() -> None:
    assert sniff(_padded(b"BZh9" + bytes(20)), final=True) == "raw"


def test_tar_checksum() -> None:
    header = bytearray(_tar_with(b"x")[:512])
    assert is_tar_header(header)
    header[0] ^= 1
    assert not is_tar_header(header)
    assert sniff(_padded(bytes(header)), final=True) == "raw"


@pytest.fixture(scope="module")
def iso_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("iso")
    content = root / "content"
    content.mkdir()
    make_base(content / "file.bin", 1 * MiB, seed=2)
    image = root / "image.iso"
    run("xorriso", "-as", "mkisofs", "-quiet", "-V", "TEST", "-o", str(image), str(content))
    return image.read_bytes()


def test_iso9660(iso_image: bytes) -> None:
    assert sniff(iso_image[:SNIFF_SIZE], final=False) == "iso"
    assert sniff(iso_image[:32774], final=True) == "iso"
    assert sniff(iso_image[:32773], final=True) == "raw"


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.sampled_from(
        [b"", b"QFI\xfb", b"KDMV", b"\x1f\x8b\x08", b"\xfd7zXZ\x00", b"(\xb5/\xfd", b"BZh9"]
    ),
    data=st.binary(max_size=600),
    size=st.sampled_from([0, 100, 1000, SNIFF_SIZE]),
    final=st.booleans(),
)
def test_fuzz(prefix: bytes, data: bytes, size: int, final: bool) -> None:
    head = (prefix + data + bytes(size))[:SNIFF_SIZE]
    try:
        kind = sniff(head, final)
    except TransferError:
        return
    if final or len(head) == SNIFF_SIZE:
        assert kind is not None
    if kind is not None and not final:
        # A verdict given before the end holds whatever follows.
        assert sniff(_padded(head), final=True) == kind


def test_magic_must_match_exactly() -> None:
    assert sniff(_padded(struct.pack(">I", 0x514649FA) + bytes(100)), final=True) == "raw"
