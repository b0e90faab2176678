"""The decoder chain: unwrap, sniff, convert; raw streams and what their end reveals."""

from __future__ import annotations

import contextlib
import gzip
import io
import lzma
import random
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from qcow2_helpers import (
    MemoryTarget,
    MiB,
    decode_to_file,
    feed_all,
    make_base,
    qcow2_from,
    qemu_compare,
    run,
    virtual_size,
)

from importer.errors import ImageTooLarge, InvalidImage, TransferError, UnsupportedFormat
from importer.formats.base import Limits
from importer.formats.decoder import ImageDecoder
from importer.formats.sniff import SNIFF_SIZE


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decoder")


@pytest.fixture(scope="module")
def raw_disk(workdir: Path) -> Path:
    return make_base(workdir / "disk.raw", 3 * MiB + 4096, seed=4)


@pytest.fixture(scope="module")
def qcow2_disk(workdir: Path, raw_disk: Path) -> Path:
    return qcow2_from(raw_disk, workdir / "disk.qcow2", "-c")


def _tar(name: str, content: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


@pytest.mark.parametrize(
    "size", [0, 1, 511, 512, 513, 40_000, SNIFF_SIZE - 1, SNIFF_SIZE, SNIFF_SIZE + 1, 3 * MiB]
)
def test_raw_streams_pass_through(size: int) -> None:
    data = random.Random(size).randbytes(size)
    target = MemoryTarget()
    decoder = ImageDecoder(target, Limits())
    info = feed_all(decoder, data, seed=size)
    assert (info.format, info.virtual_size, info.wrappers) == ("raw", size, ())
    assert target.image(size) == data
    assert decoder.detected == "raw"


def test_raw_file_matches_qemu(raw_disk: Path, tmp_path: Path) -> None:
    info, out = decode_to_file(raw_disk, tmp_path / "claim")
    assert info.format == "raw"
    qemu_compare(out, raw_disk, "raw")
    assert out.stat().st_blocks * 512 < out.stat().st_size  # zero runs are holes


def test_declared_raw_is_never_probed(qcow2_disk: Path) -> None:
    """A guest disk that starts with a qcow2 header (or gzip magic) stays as it is."""
    for data in (qcow2_disk.read_bytes(), gzip.compress(b"x" * 100_000)):
        target = MemoryTarget()
        info = feed_all(ImageDecoder(target, Limits(), declared_format="raw"), data)
        assert (info.format, info.virtual_size) == ("raw", len(data))
        assert target.image(len(data)) == data


def test_declared_format_must_match(qcow2_disk: Path, raw_disk: Path) -> None:
    with pytest.raises(InvalidImage, match="declared vmdk but is qcow2"):
        feed_all(ImageDecoder(MemoryTarget(), Limits(), "vmdk"), qcow2_disk.read_bytes())
    with pytest.raises(InvalidImage, match="declared qcow2 but is raw"):
        feed_all(ImageDecoder(MemoryTarget(), Limits(), "qcow2"), raw_disk.read_bytes())
    info = feed_all(ImageDecoder(MemoryTarget(), Limits(), "qcow2"), qcow2_disk.read_bytes())
    assert info.format == "qcow2"
    with pytest.raises(UnsupportedFormat, match="unknown image format"):
        ImageDecoder(MemoryTarget(), Limits(), "floppy")


def test_nested_wrappers(qcow2_disk: Path, tmp_path: Path) -> None:
    """xz(tar(gzip(qcow2))): every layer comes off, in order."""
    inner = gzip.compress(qcow2_disk.read_bytes(), compresslevel=1)
    wrapped = tmp_path / "disk.tar.xz"
    wrapped.write_bytes(lzma.compress(_tar("disk.qcow2.gz", inner), preset=0))
    info, out = decode_to_file(wrapped, tmp_path / "claim")
    assert (info.format, info.wrappers) == ("qcow2", ("xz", "tar", "gzip"))
    qemu_compare(out, qcow2_disk, "qcow2")


def test_too_many_wrappers() -> None:
    data = b"x" * 1000
    for _ in range(5):
        data = gzip.compress(data)
    with pytest.raises(InvalidImage, match="wrapped more than 4 times"):
        feed_all(ImageDecoder(MemoryTarget(), Limits()), data)


def test_wrappers_and_format_are_known_while_streaming(qcow2_disk: Path) -> None:
    data = zstandard.ZstdCompressor().compress(qcow2_disk.read_bytes())
    decoder = ImageDecoder(MemoryTarget(), Limits())
    decoder.feed(memoryview(data)[:20])
    assert (decoder.wrappers, decoder.detected) == (["zstd"], None)
    decoder.feed(memoryview(data)[20:])
    assert decoder.detected == "qcow2"
    assert decoder.finish().wrappers == ("zstd",)


def test_raw_size_limit() -> None:
    limits = Limits(max_virtual_size=1 * MiB)
    with pytest.raises(ImageTooLarge, match="raw"):
        feed_all(ImageDecoder(MemoryTarget(), limits), bytes(1 * MiB + 1))
    info = feed_all(ImageDecoder(MemoryTarget(), limits), bytes(1 * MiB))
    assert info.virtual_size == 1 * MiB
    with pytest.raises(ImageTooLarge):
        feed_all(ImageDecoder(MemoryTarget(), limits, "raw"), bytes(1 * MiB + 1))


def test_gzip_bomb_through_the_decoder() -> None:
    bomb = gzip.compress(bytes(256 * MiB), compresslevel=1)
    with pytest.raises(ImageTooLarge):
        feed_all(ImageDecoder(MemoryTarget(), Limits(max_virtual_size=8 * MiB)), bomb)


@pytest.fixture(scope="module")
def fixed_vhd(workdir: Path, raw_disk: Path) -> Path:
    image = workdir / "fixed.vhd"
    run(
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        str(raw_disk),
        str(image),
    )
    return image


def test_fixed_vhd_footer_makes_a_vhd(fixed_vhd: Path, tmp_path: Path) -> None:
    info, out = decode_to_file(fixed_vhd, tmp_path / "claim")
    assert info.format == "vhd"
    assert info.virtual_size == virtual_size(fixed_vhd, "vpc")
    qemu_compare(out, fixed_vhd, "vpc")


def test_fixed_vhd_gzipped(fixed_vhd: Path, tmp_path: Path) -> None:
    wrapped = tmp_path / "fixed.vhd.gz"
    wrapped.write_bytes(gzip.compress(fixed_vhd.read_bytes(), compresslevel=1))
    info, out = decode_to_file(wrapped, tmp_path / "claim")
    assert (info.format, info.wrappers) == ("vhd", ("gzip",))
    qemu_compare(out, fixed_vhd, "vpc")


def test_fixed_vhd_declared_raw_stays_raw(fixed_vhd: Path) -> None:
    data = fixed_vhd.read_bytes()
    info = feed_all(ImageDecoder(MemoryTarget(), Limits(), "raw"), data)
    assert (info.format, info.virtual_size) == ("raw", len(data))


def test_dmg_trailer_is_refused() -> None:
    koly = b"koly" + (4).to_bytes(4, "big") + (512).to_bytes(4, "big") + bytes(500)
    with pytest.raises(UnsupportedFormat, match="DMG"):
        feed_all(ImageDecoder(MemoryTarget(), Limits()), bytes(100_000) + koly)


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (b"QFI\xfb\x00\x00\x00\x01", UnsupportedFormat),
        (b"QED\x00", UnsupportedFormat),
        (b"# Disk DescriptorFile\n", InvalidImage),
    ],
)
def test_refusals_reach_the_caller(head: bytes, error: type[TransferError]) -> None:
    decoder = ImageDecoder(MemoryTarget(), Limits())
    with pytest.raises(error):
        decoder.feed(memoryview(head + bytes(1000)))


_PREFIXES = [
    b"",
    b"QFI\xfb\x00\x00\x00\x03",
    b"QFI\xfb\x00\x00\x00\x02",
    b"\x1f\x8b\x08",
    b"\xfd7zXZ\x00",
    b"(\xb5/\xfd",
    b"BZh91AY&SY",
]


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.sampled_from(_PREFIXES),
    body=st.binary(max_size=3000),
    zeros=st.sampled_from([0, 600, 70_000]),
    seed=st.integers(0, 1 << 30),
)
def test_fuzz_random_streams(prefix: bytes, body: bytes, zeros: int, seed: int) -> None:
    target = MemoryTarget()
    decoder = ImageDecoder(target, Limits(max_virtual_size=4 * MiB))
    try:
        info = feed_all(decoder, prefix + body + bytes(zeros), seed)
    except TransferError:
        return
    assert info.virtual_size <= 4 * MiB


@pytest.fixture(scope="module")
def small_wrapped(workdir: Path) -> dict[str, bytes]:
    base = make_base(workdir / "small.raw", 256 * 1024, seed=6)
    qcow2 = qcow2_from(base, workdir / "small.qcow2", "-o", "cluster_size=4096").read_bytes()
    return {
        "gzip": gzip.compress(qcow2, compresslevel=1),
        "xz": lzma.compress(qcow2, preset=0),
        "zstd": zstandard.ZstdCompressor(write_checksum=True).compress(qcow2),
        "tar": _tar("small.qcow2", qcow2),
    }


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["gzip", "xz", "zstd", "tar"]),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=5),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
    seed=st.integers(0, 1 << 30),
)
def test_fuzz_wrapped_qcow2(
    kind: str,
    flips: list[tuple[int, int]],
    cut: int | None,
    seed: int,
    small_wrapped: dict[str, bytes],
) -> None:
    data = bytearray(small_wrapped[kind])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut:]
    with contextlib.suppress(TransferError):
        feed_all(ImageDecoder(MemoryTarget(), Limits(max_virtual_size=4 * MiB)), data, seed)
