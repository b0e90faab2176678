"""qcow2 -> raw: real images from qemu-img, compared with qemu-img; a malformed corpus;
the spill; fuzzing."""

from __future__ import annotations

import contextlib
import os
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_helpers import (
    OFFSET_MASK,
    MemoryTarget,
    MiB,
    decode_to_file,
    feed_all,
    first_l2_entry_offset,
    l1_entry,
    last_l1_index,
    make_base,
    qcow2_from,
    qemu_compare,
    qemu_io,
    read_header,
    run,
    snapshot,
)

from importer.errors import ImageTooLarge, InvalidImage, TransferError, UnsupportedFormat
from importer.formats.base import Limits
from importer.formats.decoder import ImageDecoder
from importer.formats.qcow2 import Qcow2Converter
from importer.formats.spill import Spill
from importer.sinks.pvc import FileClaimTarget

BASE_SIZE = 16 * MiB


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qcow2")


@pytest.fixture(scope="session")
def base(images: Path) -> Path:
    return make_base(images / "base.raw", BASE_SIZE, seed=7)


def _snapshot_image(base: Path, dst: Path, *options: str) -> Path:
    """Data written after an internal snapshot: the active L1 differs from the snapshot's,
    and the new L2 tables come after the clusters they share with it."""
    qcow2_from(base, dst, *options)
    snapshot(dst, "before")
    qemu_io(dst, "write -P 0x55 1M 3M", "write -P 0x56 9000k 64k", "write -z 12M 1M")
    return dst


def _resized_image(base: Path, dst: Path) -> Path:
    """512-byte clusters, grown: the L1 table moves to the end, after everything it maps."""
    qcow2_from(base, dst, "-o", "cluster_size=512")
    run("qemu-img", "resize", "-f", "qcow2", str(dst), "24M")
    qemu_io(dst, "write -P 0x77 20M 1M", "write -P 0x78 100k 3k")
    return dst


def _zero_cluster_image(base: Path, dst: Path) -> Path:
    qcow2_from(base, dst)
    qemu_io(dst, "write -z 0 2M", "write -z -u 5M 1M", "write -P 0x11 5M 4k")
    return dst


def _odd_size_image(_base: Path, dst: Path) -> Path:
    """A virtual size that is not a multiple of the cluster size, data up to the end."""
    run("qemu-img", "create", "-f", "qcow2", str(dst), str(10_000_384))
    qemu_io(dst, "write -P 0x42 0 64k", "write -P 0x43 9999872 512", "write -P 0x44 9900000 8k")
    return dst


VARIANTS: dict[str, Callable[[Path, Path], Path]] = {
    "v3": lambda b, d: qcow2_from(b, d),
    "v2": lambda b, d: qcow2_from(b, d, "-o", "compat=0.10"),
    "cluster-512": lambda b, d: qcow2_from(b, d, "-o", "cluster_size=512"),
    "cluster-4k-v2": lambda b, d: qcow2_from(b, d, "-o", "cluster_size=4096,compat=0.10"),
    "cluster-2m": lambda b, d: qcow2_from(b, d, "-o", "cluster_size=2M"),
    "zlib": lambda b, d: qcow2_from(b, d, "-c"),
    "zlib-512": lambda b, d: qcow2_from(b, d, "-c", "-o", "cluster_size=512"),
    "zstd": lambda b, d: qcow2_from(b, d, "-c", "-o", "compression_type=zstd"),
    "zstd-2m": lambda b, d: qcow2_from(b, d, "-c", "-o", "compression_type=zstd,cluster_size=2M"),
    "extended-l2": lambda b, d: qcow2_from(b, d, "-o", "extended_l2=on"),
    "extended-l2-16k-zlib": lambda b, d: qcow2_from(
        b, d, "-c", "-o", "extended_l2=on,cluster_size=16K"
    ),
    "prealloc-metadata": lambda b, d: qcow2_from(b, d, "-o", "preallocation=metadata"),
    "prealloc-falloc": lambda b, d: qcow2_from(b, d, "-o", "preallocation=falloc"),
    "snapshot": lambda b, d: _snapshot_image(b, d),
    "snapshot-extended-l2": lambda b, d: _snapshot_image(b, d, "-o", "extended_l2=on"),
    "snapshot-zlib": lambda b, d: _snapshot_image(b, d, "-c"),
    "resized": _resized_image,
    "zero-clusters": _zero_cluster_image,
    "odd-size": _odd_size_image,
}


# Slow for qemu-img to make: built from a smaller base.
SMALL_VARIANTS = {"zlib-512"}


@pytest.fixture(scope="session")
def small_base(images: Path) -> Path:
    return make_base(images / "base-small.raw", 6 * MiB, seed=8)


@pytest.fixture(scope="session")
def variant(images: Path, base: Path, small_base: Path) -> Callable[..., Path]:
    made: dict[tuple[str, bool], Path] = {}

    def get(name: str, small: bool = False) -> Path:
        small = small or name in SMALL_VARIANTS
        if (name, small) not in made:
            dst = images / f"{name}{'-small' if small else ''}.qcow2"
            made[name, small] = VARIANTS[name](small_base if small else base, dst)
        return made[name, small]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_converts_like_qemu(name: str, variant: Callable[..., Path], tmp_path: Path) -> None:
    image = variant(name)
    info, raw = decode_to_file(image, tmp_path / "claim", seed=len(name))
    assert info.format == "qcow2"
    assert info.wrappers == ()
    assert not info.cdrom
    qemu_compare(raw, image, "qcow2")


@pytest.mark.parametrize(
    ("name", "tool"),
    [
        ("v3", "gzip"),
        ("snapshot", "gzip"),
        ("zlib", "xz"),
        ("resized", "xz"),
        ("v3", "zstd"),
        ("extended-l2", "zstd"),
        ("zero-clusters", "bzip2"),
    ],
)
def test_wrapped(name: str, tool: str, variant: Callable[..., Path], tmp_path: Path) -> None:
    # xz and bzip2 are slow to compress: smaller images for them.
    image = variant(name, small=tool in ("xz", "bzip2"))
    wrapped = tmp_path / f"{image.name}.{tool}"
    with open(wrapped, "wb") as out:
        subprocess.run([tool, "-c", "-1", str(image)], stdout=out, check=True)
    info, raw = decode_to_file(wrapped, tmp_path / "claim", seed=3)
    assert info.format == "qcow2"
    assert info.wrappers == (tool,)
    qemu_compare(raw, image, "qcow2")


def test_tar_holding_one_qcow2(variant: Callable[..., Path], tmp_path: Path) -> None:
    image = variant("zlib")
    folder = tmp_path / ("a-directory-with-a-rather-long-name-" * 3)
    folder.mkdir()
    (folder / "disk.qcow2").write_bytes(image.read_bytes())
    archive = tmp_path / "disk.tar.gz"
    run("tar", "-C", str(tmp_path), "-czf", str(archive), folder.name)
    info, raw = decode_to_file(archive, tmp_path / "claim", seed=5)
    assert (info.format, info.wrappers) == ("qcow2", ("gzip", "tar"))
    qemu_compare(raw, image, "qcow2")


def test_spill_goes_to_a_side_file_and_is_released(
    variant: Callable[..., Path], tmp_path: Path
) -> None:
    image = variant("resized")
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    seen: list[int] = []
    original_add = Spill.add

    def add(self: Spill, offset: int, data: memoryview) -> None:
        original_add(self, offset, data)
        seen.append(len(_spill_fds(spill_dir)))

    limits = Limits(spill_memory=256 * 1024, spill_dir=str(spill_dir))
    try:
        Spill.add = add  # type: ignore[method-assign]
        info, raw = decode_to_file(image, tmp_path / "claim", limits=limits)
    finally:
        Spill.add = original_add  # type: ignore[method-assign]
    assert max(seen) == 1  # the side file was used
    assert _spill_fds(spill_dir) == []
    qemu_compare(raw, image, "qcow2")
    assert info.virtual_size == 24 * MiB


def _spill_fds(directory: Path) -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith(str(directory)):
            links.append(link)
    return links


def test_spill_released_on_error_and_on_close(variant: Callable[..., Path], tmp_path: Path) -> None:
    data = variant("resized").read_bytes()
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    limits = Limits(spill_memory=64 * 1024, spill_dir=str(spill_dir))

    decoder = ImageDecoder(MemoryTarget(), limits)
    decoder.feed(memoryview(data)[: len(data) * 3 // 4])
    assert len(_spill_fds(spill_dir)) == 1
    with pytest.raises(InvalidImage, match=r"truncated|past the end"):
        decoder.finish()
    assert _spill_fds(spill_dir) == []

    decoder = ImageDecoder(MemoryTarget(), limits)
    decoder.feed(memoryview(data)[: len(data) // 2])
    assert len(_spill_fds(spill_dir)) == 1
    decoder.close()  # a transfer that failed elsewhere
    assert _spill_fds(spill_dir) == []


def test_spill_is_bounded() -> None:
    spill = Spill(memory_limit=1000, total_limit=5000, directory=None)
    spill.add(0, memoryview(bytes(3000)))
    assert spill.covers(0, 3000)
    with pytest.raises(ImageTooLarge, match="before the tables"):
        spill.add(3000, memoryview(bytes(3000)))
    spill.clear()
    assert not spill


def test_spill_reads_across_memory_and_file() -> None:
    rnd = random.Random(1)
    spill = Spill(memory_limit=10_000, total_limit=1 << 30, directory=None)
    data = rnd.randbytes(50_000)
    pos = 0
    for n in (3000, 5000, 9000, 1, 20_000):
        spill.add(pos, memoryview(data)[pos : pos + n])
        pos += n
    spill.add(pos + 100, memoryview(data)[pos + 100 :])
    assert spill.covers(10, pos)
    assert not spill.covers(pos - 10, pos + 10)
    got = b"".join(bytes(piece) for _, piece in spill.read(10, pos))
    assert got == data[10:pos]
    spill.clear()


# -- several guest clusters on one host cluster ---------------------------------------------


def _duplicate_first_mapping(data: bytearray) -> None:
    """Points the second allocated entry of the first L2 table at the first one's cluster."""
    first = first_l2_entry_offset(data)
    header = read_header(data)
    table_end = (first | ((1 << header["cluster_bits"]) - 1)) + 1
    for pos in range(first + 8, table_end, 8):
        if struct.unpack_from(">Q", data, pos)[0]:
            data[pos : pos + 8] = data[first : first + 8]
            return
    raise AssertionError("one allocated entry only")


@pytest.mark.parametrize("name", ["v3", "resized"])
def test_host_cluster_mapped_twice(name: str, variant: Callable[..., Path], tmp_path: Path) -> None:
    """Ahead of the data (v3) or served twice from the spill (resized), a cluster mapped
    at two guest offsets lands at both, as qemu reads it."""
    data = bytearray(variant(name).read_bytes())
    _duplicate_first_mapping(data)
    crafted = tmp_path / "crafted.qcow2"
    crafted.write_bytes(data)
    info, raw = decode_to_file(crafted, tmp_path / "claim")
    qemu_compare(raw, crafted, "qcow2")
    assert info.format == "qcow2"


def test_host_cluster_mapped_again_after_it_was_written_is_refused(
    variant: Callable[..., Path],
) -> None:
    """A later table pointing at data already written out (only a crafted image does
    that) cannot be served in one pass: refused, not converted wrongly."""
    data = bytearray(variant("cluster-512").read_bytes())
    # The last L2 table comes long after the data the first one maps.
    early = first_l2_entry_offset(data)
    late = first_l2_entry_offset(data, last_l1_index(data))
    assert late > struct.unpack_from(">Q", data, early)[0] & OFFSET_MASK
    data[late : late + 8] = data[early : early + 8]
    with pytest.raises(InvalidImage, match="overlaps"):
        feed_all(Qcow2Converter(MemoryTarget(), Limits()), data)


# -- the malformed corpus --------------------------------------------------------------------


def _u32(data: bytearray, offset: int, value: int) -> None:
    struct.pack_into(">I", data, offset, value)


def _u64(data: bytearray, offset: int, value: int) -> None:
    struct.pack_into(">Q", data, offset, value)


def _l1(data: bytearray) -> int:
    return read_header(data)["l1_table_offset"]


def _first_l2(data: bytearray) -> int:
    return first_l2_entry_offset(data)


def _set_bits(offset: int, bits: int) -> Callable[[bytearray], object]:
    return lambda d: _u64(d, offset, struct.unpack_from(">Q", d, offset)[0] | bits)


Mutation = Callable[[bytearray], object]


def _garble_first_compressed(data: bytearray) -> None:
    entry_offset = first_l2_entry_offset(data)
    entry = struct.unpack_from(">Q", data, entry_offset)[0]
    assert entry & (1 << 62)
    host = entry & ((1 << 54) - 1)
    data[host : host + 64] = bytes(range(200, 232)) * 2


CORPUS: list[tuple[str, str, Mutation, type[TransferError], str]] = [
    (
        "truncated-in-header",
        "small",
        lambda d: d.__delitem__(slice(100, None)),
        InvalidImage,
        "truncated",
    ),
    (
        "truncated-in-header-cluster",
        "small",
        lambda d: d.__delitem__(slice(5000, None)),
        InvalidImage,
        "truncated",
    ),
    (
        "truncated-after-l1",
        "small",
        lambda d: d.__delitem__(slice(_l1(d) + 4096, None)),
        InvalidImage,
        "past the end|truncated",
    ),
    (
        "truncated-half",
        "small",
        lambda d: d.__delitem__(slice(len(d) // 2, None)),
        InvalidImage,
        "truncated|past the end",
    ),
    (
        "truncated-last-byte",
        "small",
        lambda d: d.__delitem__(slice(-1, None)),
        InvalidImage,
        "truncated",
    ),
    (
        "truncated-compressed",
        "small-zlib",
        lambda d: d.__delitem__(slice(len(d) // 3, None)),
        InvalidImage,
        "truncated|past the end|decompress",
    ),
    ("version-1", "small", lambda d: _u32(d, 4, 1), UnsupportedFormat, "version 1"),
    ("version-4", "small", lambda d: _u32(d, 4, 4), UnsupportedFormat, "version 4"),
    ("cluster-bits-8", "small", lambda d: _u32(d, 20, 8), InvalidImage, "cluster_bits 8"),
    ("cluster-bits-22", "small", lambda d: _u32(d, 20, 22), InvalidImage, "cluster_bits 22"),
    ("encrypted-aes", "small", lambda d: _u32(d, 32, 1), InvalidImage, "encrypted"),
    ("corrupt-bit", "small", _set_bits(72, 1 << 1), InvalidImage, "corrupt"),
    ("data-file-bit", "small", _set_bits(72, 1 << 2), InvalidImage, "external data file"),
    ("unknown-incompatible-bit", "small", _set_bits(72, 1 << 20), InvalidImage, "bit 20"),
    ("compression-bit-without-type", "small", _set_bits(72, 1 << 3), InvalidImage, "compression"),
    (
        "compression-type-unknown",
        "small",
        lambda d: (_set_bits(72, 1 << 3)(d), d.__setitem__(104, 7)),
        InvalidImage,
        "compression type 7",
    ),
    ("huge-l1", "small", lambda d: _u32(d, 36, 0x7FFF_FFFF), InvalidImage, "too large"),
    ("l1-too-small", "small", lambda d: _u32(d, 36, 0), InvalidImage, "needs 1"),
    ("huge-size", "small", lambda d: _u64(d, 24, 1 << 60), ImageTooLarge, "exceeds"),
    ("l1-past-end", "small", lambda d: _u64(d, 40, 1 << 40), InvalidImage, "past the end"),
    ("l1-unaligned", "small", lambda d: _u64(d, 40, _l1(d) + 8), InvalidImage, "aligned"),
    ("l1-on-header", "small", lambda d: _u64(d, 40, 0), InvalidImage, "header"),
    (
        "l2-past-end",
        "small",
        lambda d: _u64(d, _l1(d), (1 << 40) | (1 << 63)),
        InvalidImage,
        "past the end",
    ),
    (
        "l2-unaligned",
        "small",
        lambda d: _u64(d, _l1(d), (1 << 63) | 0x10200),
        InvalidImage,
        "unaligned",
    ),
    ("l2-on-l1", "small", lambda d: _u64(d, _l1(d), _l1(d) | (1 << 63)), InvalidImage, "overlaps"),
    (
        "data-past-end",
        "small",
        lambda d: _u64(d, _first_l2(d), (1 << 40) | (1 << 63)),
        InvalidImage,
        "past the end",
    ),
    (
        "data-unaligned",
        "small",
        lambda d: _u64(d, _first_l2(d), (1 << 63) | 0x30200),
        InvalidImage,
        "unaligned",
    ),
    (
        "data-on-l1",
        "small",
        lambda d: _u64(d, _first_l2(d), _l1(d) | (1 << 63)),
        InvalidImage,
        "overlaps",
    ),
    (
        "data-on-l2",
        "small",
        lambda d: _u64(d, _first_l2(d), _first_l2(d) & ~0xFFFF),
        InvalidImage,
        "overlaps",
    ),
    ("header-length-short", "small", lambda d: _u32(d, 100, 50), InvalidImage, "header_length"),
    ("header-length-huge", "small", lambda d: _u32(d, 100, 1 << 20), InvalidImage, "header_length"),
    ("refcount-order-7", "small", lambda d: _u32(d, 96, 7), InvalidImage, "refcount_order"),
    (
        "refcount-table-unaligned",
        "small",
        lambda d: _u64(d, 48, 0x10008),
        InvalidImage,
        "refcount table",
    ),
    ("too-many-snapshots", "small", lambda d: _u32(d, 60, 1 << 20), InvalidImage, "snapshots"),
    (
        "extension-overruns",
        "small",
        lambda d: _u32(d, read_header(d)["header_length"] + 4, 1 << 20),
        InvalidImage,
        "overruns",
    ),
    (
        "v2-zero-cluster",
        "small-v2",
        lambda d: _set_bits(_first_l2(d), 1)(d),
        InvalidImage,
        "zero cluster",
    ),
    (
        "subcluster-alloc-and-zero",
        "small-extended",
        lambda d: _u64(d, _first_l2(d) + 8, 0x1_0000_0001),
        InvalidImage,
        "both allocated",
    ),
    (
        "subcluster-without-host",
        "small-extended",
        lambda d: _u64(d, _first_l2(d), 0),
        InvalidImage,
        "no host offset",
    ),
    (
        "compressed-garbage",
        "small-zlib",
        lambda d: _garble_first_compressed(d),
        InvalidImage,
        "decompress",
    ),
    (
        "compressed-zstd-garbage",
        "small-zstd",
        lambda d: _garble_first_compressed(d),
        InvalidImage,
        "decompress",
    ),
]


def _small_images(images: Path) -> dict[str, Path]:
    base = images / "small.raw"
    if not base.exists():
        make_base(base, 4 * MiB, seed=11)
    made = {}
    for name, options in {
        "small": ["-o", "cluster_size=65536"],
        "small-v2": ["-o", "compat=0.10"],
        "small-zlib": ["-c"],
        "small-zstd": ["-c", "-o", "compression_type=zstd"],
        "small-extended": ["-o", "extended_l2=on"],
    }.items():
        path = images / f"{name}.qcow2"
        if not path.exists():
            qcow2_from(base, path, *options)
        made[name] = path
    return made


@pytest.fixture(scope="session")
def small_images(images: Path) -> dict[str, Path]:
    return _small_images(images)


@pytest.mark.parametrize(
    ("case", "source", "mutate", "error", "message"), CORPUS, ids=[c[0] for c in CORPUS]
)
def test_malformed(
    case: str,
    source: str,
    mutate: Mutation,
    error: type[TransferError],
    message: str,
    small_images: dict[str, Path],
) -> None:
    data = bytearray(small_images[source].read_bytes())
    mutate(data)
    with pytest.raises(error, match=message) as caught:
        feed_all(ImageDecoder(MemoryTarget(), Limits()), data)
    assert caught.value.message.startswith(("qcow2", "qcow ")), caught.value.message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["-b", "{base}", "-F", "raw"], "backing file"),
        (["-o", "data_file={data}"], "external data file"),
        (
            [
                "--object",
                "secret,id=sec0,data=123456",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ],
            r"encrypted \(LUKS\)",
        ),
    ],
    ids=["backing-file", "data-file", "encrypted-luks"],
)
def test_refused_features(options: list[str], message: str, tmp_path: Path) -> None:
    base = make_base(tmp_path / "b.raw", 1 * MiB, seed=1)
    image = tmp_path / "image.qcow2"
    args = [a.format(base=base, data=tmp_path / "data.raw") for a in options]
    for attempt in range(3):
        try:
            run("qemu-img", "create", "-f", "qcow2", *args, str(image), "1M")
            break
        except subprocess.CalledProcessError as exc:
            # qemu times its LUKS key derivation with the CPU clock and gives up now and
            # then on a busy machine ("Unable to get accurate CPU usage").
            if attempt == 2 or "accurate CPU usage" not in (exc.stderr or ""):
                raise
    with pytest.raises(InvalidImage, match=message):
        feed_all(ImageDecoder(MemoryTarget(), Limits()), image.read_bytes())


def test_dirty_image_is_accepted(small_images: dict[str, Path]) -> None:
    clean = small_images["small"].read_bytes()
    dirty = bytearray(clean)
    _set_bits(72, 1)(dirty)
    expected = MemoryTarget()
    info = feed_all(Qcow2Converter(expected, Limits()), clean)
    got = MemoryTarget()
    assert feed_all(Qcow2Converter(got, Limits()), dirty) == info
    assert got.image(info.virtual_size) == expected.image(info.virtual_size)


def test_size_limits(small_images: dict[str, Path], tmp_path: Path) -> None:
    data = small_images["small"].read_bytes()
    with pytest.raises(ImageTooLarge, match="exceeds the limit"):
        feed_all(Qcow2Converter(MemoryTarget(), Limits(max_virtual_size=2 * MiB)), data)
    target = FileClaimTarget(tmp_path / "claim", capacity=2 * MiB)
    with pytest.raises(ImageTooLarge):
        feed_all(ImageDecoder(target, Limits()), data)
    target.abort()
    assert not (tmp_path / "claim" / "disk.img").exists()


def test_zero_size_image(tmp_path: Path) -> None:
    image = tmp_path / "empty.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(image), "0")
    target = MemoryTarget()
    info = feed_all(ImageDecoder(target, Limits()), image.read_bytes())
    assert (info.format, info.virtual_size, target.written) == ("qcow2", 0, 0)


# -- fuzzing -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fuzz_images(images: Path) -> dict[str, bytes]:
    base = make_base(images / "fuzz.raw", 512 * 1024, seed=5)
    out = {}
    for name, options in {
        "plain": ["-o", "cluster_size=4096"],
        "zlib": ["-c", "-o", "cluster_size=4096"],
        "zstd-ext": ["-c", "-o", "cluster_size=16384,extended_l2=on,compression_type=zstd"],
    }.items():
        path = qcow2_from(base, images / f"fuzz-{name}.qcow2", *options)
        out[name] = path.read_bytes()
    snap = _snapshot_small(base, images / "fuzz-snapshot.qcow2")
    out["snapshot"] = snap.read_bytes()
    return out


def _snapshot_small(base: Path, dst: Path) -> Path:
    qcow2_from(base, dst, "-o", "cluster_size=4096")
    snapshot(dst, "s")
    qemu_io(dst, "write -P 0x55 8k 100k", "write -z 200k 8k")
    return dst


@pytest.fixture(scope="session")
def fuzz_expected(images: Path, fuzz_images: dict[str, bytes]) -> dict[str, bytes]:
    out = {}
    for name in fuzz_images:
        raw = images / f"fuzz-{name}.raw"
        run(
            "qemu-img",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            str(images / f"fuzz-{name}.qcow2"),
            str(raw),
        )
        out[name] = raw.read_bytes()
    return out


_FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FUZZ
@given(
    name=st.sampled_from(["plain", "zlib", "zstd-ext", "snapshot"]),
    seed=st.integers(0, 2**32),
    spill_memory=st.sampled_from([0, 4096, 1 << 20]),
)
def test_fuzz_piece_sizes(
    name: str,
    seed: int,
    spill_memory: int,
    fuzz_images: dict[str, bytes],
    fuzz_expected: dict[str, bytes],
) -> None:
    target = MemoryTarget()
    converter = Qcow2Converter(target, Limits(spill_memory=spill_memory))
    info = feed_all(converter, fuzz_images[name], seed)
    assert target.image(info.virtual_size) == fuzz_expected[name]


@_FUZZ
@given(
    name=st.sampled_from(["plain", "zlib", "zstd-ext", "snapshot"]),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8),
    header_flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
    seed=st.integers(0, 2**32),
)
def test_fuzz_mutated_images(
    name: str,
    flips: list[tuple[int, int]],
    header_flips: list[tuple[int, int]],
    cut: int | None,
    seed: int,
    fuzz_images: dict[str, bytes],
) -> None:
    data = bytearray(fuzz_images[name])
    header = read_header(data)
    tables = [header["l1_table_offset"], l1_entry(data, 0) & 0x00FF_FFFF_FFFF_FE00]
    for position, value in flips:
        # Aim half of the flips at the tables, where they matter most.
        if position % 2:
            position = tables[position % 4 // 2] + position % 4096
        data[position % len(data)] = value
    for position, value in header_flips:
        data[position] = value
    if cut is not None:
        del data[cut:]
    target = MemoryTarget()
    with contextlib.suppress(TransferError):
        feed_all(ImageDecoder(target, Limits(max_virtual_size=64 * MiB)), data, seed)


def test_compressed_clusters_mapped_many_times(
    small_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every entry of an L2 table on one compressed cluster: converted as qemu reads it,
    while the bytes collected at once stay bounded."""
    data = bytearray(small_images["small-zlib"].read_bytes())
    first = first_l2_entry_offset(data)
    table = first & ~0xFFFF
    entry = data[first : first + 8]
    for pos in range(table, table + 64 * 8, 8):
        data[pos : pos + 8] = entry
    expected = MemoryTarget()
    info = feed_all(Qcow2Converter(expected, Limits()), data)
    cluster = expected.image(info.virtual_size)[:65536]
    assert expected.image(info.virtual_size)[: 64 * 65536] == cluster * 64

    monkeypatch.setattr("importer.formats.qcow2.MAX_COLLECTING", 8 * 65536)
    with pytest.raises(InvalidImage, match="overlap each other"):
        feed_all(Qcow2Converter(MemoryTarget(), Limits()), data)
