"""VHDX: dynamic and fixed images converted on the fly, bad images refused."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vfmt_helpers import (
    MiB,
    convert_to_raw,
    convert_watching_spill,
    empty_image,
    fuzz_image,
    fuzz_run,
    qemu_compare,
    qemu_convert,
    qemu_virtual_size,
    run_null,
    write_base,
)

from importer.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from importer.formats.base import Limits, NullTarget
from importer.formats.vhdx import (
    BAT_GUID,
    FILE_PARAMETERS,
    LOGICAL_SECTOR_SIZE,
    METADATA_GUID,
    PAGE83_DATA,
    VIRTUAL_DISK_SIZE,
    VhdxConverter,
    crc32c,
)

SIZE = 24 * MiB
KiB = 1024


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vhdx")


@pytest.fixture(scope="module")
def base(workdir: Path) -> Path:
    return write_base(workdir / "base.raw", SIZE, seed=31)


@pytest.fixture(scope="module")
def dynamic_path(workdir: Path, base: Path) -> Path:
    return qemu_convert(base, workdir / "dynamic.vhdx", "vhdx", "block_size=1M")


@pytest.fixture(scope="module")
def dynamic(dynamic_path: Path) -> bytes:
    return dynamic_path.read_bytes()


@pytest.fixture(scope="module")
def small(workdir: Path) -> bytes:
    raw = write_base(workdir / "small.raw", 3 * MiB, seed=32)
    return qemu_convert(raw, workdir / "small.vhdx", "vhdx", "block_size=1M").read_bytes()


def fix_crc(blob: bytearray, offset: int, size: int) -> None:
    blob[offset + 4 : offset + 8] = bytes(4)
    struct.pack_into("<I", blob, offset + 4, crc32c(bytes(blob[offset : offset + size])))


def regions(image: bytes) -> dict[uuid.UUID, tuple[int, int, int]]:
    """guid -> (entry offset in the file, region offset, region length)."""
    (count,) = struct.unpack_from("<I", image, 192 * KiB + 8)
    out = {}
    for i in range(count):
        at = 192 * KiB + 16 + 32 * i
        guid, offset, length, _ = struct.unpack_from("<16sQII", image, at)
        out[uuid.UUID(bytes_le=guid)] = (at, offset, length)
    return out


def metadata_items(image: bytes) -> dict[uuid.UUID, tuple[int, int]]:
    """item guid -> (entry offset in the file, item offset in the file)."""
    start = regions(image)[METADATA_GUID][1]
    (count,) = struct.unpack_from("<H", image, start + 10)
    out = {}
    for i in range(count):
        at = start + 32 + 32 * i
        guid, offset, _length, _flags = struct.unpack_from("<16sIII", image, at)
        out[uuid.UUID(bytes_le=guid)] = (at, start + offset)
    return out


def bat_entries(image: bytes) -> tuple[int, list[int]]:
    start = regions(image)[BAT_GUID][1]
    return start, list(struct.unpack_from("<32Q", image, start))


def current_header(image: bytes) -> int:
    seqs = [struct.unpack_from("<Q", image, off + 8)[0] for off in (64 * KiB, 128 * KiB)]
    return 64 * KiB if seqs[0] > seqs[1] else 128 * KiB


def patch(at: Callable[[bytes], int], fmt: str, value: int) -> Callable[[bytes], bytes]:
    def change(image: bytes) -> bytes:
        blob = bytearray(image)
        struct.pack_into(fmt, blob, at(image), value)
        return bytes(blob)

    return change


def item(guid: uuid.UUID) -> Callable[[bytes], int]:
    return lambda image: metadata_items(image)[guid][1]


def bat_entry(which: int, value: Callable[[list[int]], int]) -> Callable[[bytes], bytes]:
    """Sets the `which`-th fully present payload entry."""

    def change(image: bytes) -> bytes:
        start, entries = bat_entries(image)
        present = [i for i, e in enumerate(entries) if e & 7 == 6]
        blob = bytearray(image)
        struct.pack_into("<Q", blob, start + 8 * present[which], value(entries))
        return bytes(blob)

    return change


def in_header(offset: int, fmt: str, value: object) -> Callable[[bytes], bytes]:
    """Changes the current header and fixes its checksum."""

    def change(image: bytes) -> bytes:
        blob = bytearray(image)
        at = current_header(image)
        struct.pack_into(fmt, blob, at + offset, value)
        fix_crc(blob, at, 4 * KiB)
        return bytes(blob)

    return change


def in_region_table(change_entry: Callable[[bytearray], None]) -> Callable[[bytes], bytes]:
    def change(image: bytes) -> bytes:
        blob = bytearray(image)
        change_entry(blob)
        fix_crc(blob, 192 * KiB, 64 * KiB)
        return bytes(blob)

    return change


@pytest.mark.parametrize(
    "options",
    [(), ("block_size=1M",), ("subformat=fixed",), ("block_size=64M",)],
    ids=["default", "1M-blocks", "fixed", "64M-blocks"],
)
def test_matches_qemu(workdir: Path, base: Path, options: tuple[str, ...]) -> None:
    name = "-".join(options) or "default"
    image = qemu_convert(base, workdir / f"{name}.vhdx", "vhdx", *options)
    for seed in (1, 2):
        info, raw = convert_to_raw(VhdxConverter, image, workdir / f"o-{name}-{seed}", seed)
        assert info.format == "vhdx"
        assert info.virtual_size == qemu_virtual_size(image, "vhdx") == raw.stat().st_size
        result = qemu_compare(raw, image, "vhdx")
        assert result.returncode == 0, result.stdout + result.stderr


def test_one_bad_header_is_enough(workdir: Path, dynamic: bytes) -> None:
    blob = bytearray(dynamic)
    blob[current_header(dynamic) + 200] ^= 1  # the newer header is corrupt: use the older
    image = workdir / "one-header.vhdx"
    image.write_bytes(blob)
    _, raw = convert_to_raw(VhdxConverter, image, workdir / "one-header", 3)
    assert qemu_compare(raw, image, "vhdx").returncode == 0


def test_empty_log_with_a_guid_is_accepted(workdir: Path, dynamic: bytes) -> None:
    image = workdir / "log-guid.vhdx"
    image.write_bytes(in_header(48, "16s", b"\x11" * 16)(dynamic))
    _, raw = convert_to_raw(VhdxConverter, image, workdir / "log-guid", 4)
    assert qemu_compare(raw, image, "vhdx").returncode == 0


def test_4k_logical_sectors_keep_the_whole_disk(workdir: Path, base: Path, dynamic: bytes) -> None:
    """The spec's size, not qemu's eighth of it (qemu divides by the logical sector size)."""
    image = workdir / "4k.vhdx"
    image.write_bytes(patch(item(LOGICAL_SECTOR_SIZE), "<I", 4096)(dynamic))
    info, raw = convert_to_raw(VhdxConverter, image, workdir / "4k", 5)
    assert info.virtual_size == SIZE
    assert qemu_compare(raw, base, "raw").returncode == 0


def test_tables_after_the_data_go_through_the_spill(workdir: Path, dynamic: bytes) -> None:
    """BAT and metadata regions moved to the end of the file: every payload block waits in
    the spill (memory, then the side file) until the BAT arrives."""
    blob = bytearray(dynamic)
    table = regions(dynamic)
    blob += bytes(-len(blob) % MiB)
    for guid in (METADATA_GUID, BAT_GUID):
        at, offset, length = table[guid]
        moved_to = len(blob)
        blob += blob[offset : offset + length]
        blob[offset : offset + length] = bytes(length)
        struct.pack_into("<Q", blob, at + 16, moved_to)
    fix_crc(blob, 192 * KiB, 64 * KiB)
    image = workdir / "tables-last.vhdx"
    image.write_bytes(blob)
    spill_dir = workdir / "spill"
    spill_dir.mkdir()
    limits = Limits(spill_memory=MiB, spill_dir=str(spill_dir))
    raw, memory, side_file = convert_watching_spill(
        VhdxConverter, image, workdir / "tables-last", 6, limits
    )
    assert memory <= MiB < side_file
    assert qemu_compare(raw, image, "vhdx").returncode == 0
    assert list(spill_dir.iterdir()) == []


def test_virtual_size_limit(dynamic: bytes) -> None:
    converter = VhdxConverter(NullTarget(), Limits(max_virtual_size=8 * MiB))
    with pytest.raises(ImageTooLarge, match="exceeds the limit"):
        converter.feed(memoryview(dynamic))


def test_capacity_of_the_target(dynamic: bytes) -> None:
    converter = VhdxConverter(NullTarget(capacity=SIZE - 1), Limits())
    with pytest.raises(ImageTooLarge):
        converter.feed(memoryview(dynamic))


def _log_entry(image: bytes) -> bytes:
    guid = b"\x22" * 16
    blob = bytearray(in_header(48, "16s", guid)(image))
    (log_offset,) = struct.unpack_from("<Q", blob, current_header(image) + 72)
    blob[log_offset : log_offset + 4] = b"loge"
    blob[log_offset + 32 : log_offset + 48] = guid
    return bytes(blob)


def _same_sequence(image: bytes) -> bytes:
    blob = bytearray(image)
    (seq,) = struct.unpack_from("<Q", blob, 64 * KiB + 8)
    struct.pack_into("<Q", blob, 128 * KiB + 8, seq)
    fix_crc(blob, 128 * KiB, 4 * KiB)
    return bytes(blob)


def _unknown_region(required: int) -> Callable[[bytes], bytes]:
    def change_entry(blob: bytearray) -> None:
        (count,) = struct.unpack_from("<I", blob, 192 * KiB + 8)
        struct.pack_into("<I", blob, 192 * KiB + 8, count + 1)
        struct.pack_into(
            "<16sQII",
            blob,
            192 * KiB + 16 + 32 * count,
            uuid.uuid4().bytes_le,
            40 * MiB,
            MiB,
            required,
        )

    return in_region_table(change_entry)


def _unknown_item(image: bytes) -> bytes:
    blob = bytearray(image)
    at, _ = metadata_items(image)[PAGE83_DATA]
    start = regions(image)[METADATA_GUID][1]
    (count,) = struct.unpack_from("<H", blob, start + 10)
    entry = bytearray(blob[at : at + 32])
    entry[:16] = uuid.uuid4().bytes_le
    struct.pack_into("<I", entry, 24, 4)  # required
    blob[start + 32 + 32 * count : start + 64 + 32 * count] = entry
    struct.pack_into("<H", blob, start + 10, count + 1)
    return bytes(blob)


def _missing_item(image: bytes) -> bytes:
    blob = bytearray(image)
    at, _ = metadata_items(image)[PAGE83_DATA]
    blob[at : at + 16] = uuid.uuid4().bytes_le
    struct.pack_into("<I", blob, at + 24, 0)  # an optional item of its own
    return bytes(blob)


def _region_offset(guid: uuid.UUID) -> Callable[[bytes], int]:
    return lambda image: regions(image)[guid][1]


@pytest.mark.parametrize("options", [(), ("subformat=fixed",)])
def test_empty_disk(workdir: Path, options: tuple[str, ...]) -> None:
    image = empty_image(workdir, "vhdx", *options)
    info, raw = convert_to_raw(VhdxConverter, image, workdir / ("empty" + "-".join(options)), 1)
    assert info.virtual_size == qemu_virtual_size(image, "vhdx") == raw.stat().st_size
    assert raw.stat().st_blocks == 0
    assert qemu_compare(raw, image, "vhdx").returncode == 0


MALFORMED: list[tuple[str, Callable[[bytes], bytes], type[Exception], str]] = [
    ("file identifier", patch(lambda im: 0, "<8s", b"vhdxfilX"), InvalidImage, "vhdxfile"),
    (
        "both headers corrupt",
        lambda im: patch(lambda _: 64 * KiB + 300, "<B", 1)(
            patch(lambda _: 128 * KiB + 300, "<B", 1)(im)
        ),
        InvalidImage,
        "neither header",
    ),
    ("same sequence, different headers", _same_sequence, InvalidImage, "sequence number"),
    ("log needs replay", _log_entry, InvalidImage, "needs log replay"),
    ("log version", in_header(64, "<H", 1), UnsupportedFormat, "log version"),
    ("region table checksum", patch(lambda im: 192 * KiB + 1000, "<B", 1), InvalidImage, "CRC"),
    ("unknown required region", _unknown_region(1), UnsupportedFormat, "required region"),
    (
        "region overlaps the log",
        in_region_table(lambda blob: struct.pack_into("<Q", blob, 192 * KiB + 16 + 16, MiB)),
        InvalidImage,
        "overlaps the log",
    ),
    ("unknown required metadata item", _unknown_item, UnsupportedFormat, "required metadata"),
    ("missing metadata item", _missing_item, InvalidImage, "page 83 data metadata item is missing"),
    (
        "metadata signature",
        lambda im: patch(_region_offset(METADATA_GUID), "<8s", b"metadatX")(im),
        InvalidImage,
        "signature",
    ),
    (
        "has a parent",
        patch(lambda im: item(FILE_PARAMETERS)(im) + 4, "<I", 2),
        InvalidImage,
        "differencing",
    ),
    ("block size", patch(item(FILE_PARAMETERS), "<I", 3 * MiB), InvalidImage, "block size"),
    ("sector size", patch(item(LOGICAL_SECTOR_SIZE), "<I", 1024), InvalidImage, "sector sizes"),
    (
        "size not a multiple of the sector",
        patch(item(VIRTUAL_DISK_SIZE), "<Q", SIZE - 100),
        InvalidImage,
        "not a multiple",
    ),
    (
        "BAT region too small",
        patch(item(VIRTUAL_DISK_SIZE), "<Q", 1 << 40),
        InvalidImage,
        "too small",
    ),
    (
        "partially present block",
        bat_entry(0, lambda entries: (entries[0] & ~7) | 7),
        InvalidImage,
        "partially present",
    ),
    ("invalid block state", bat_entry(1, lambda e: 4), InvalidImage, "invalid state 4"),
    (
        "block in the metadata region",
        bat_entry(2, lambda e: 3 * MiB | 6),
        InvalidImage,
        "overlaps the metadata region",
    ),
    (
        "block in the header section",
        bat_entry(2, lambda e: 6),
        InvalidImage,
        "overlaps the header section",
    ),
    (
        "two blocks share data",
        bat_entry(3, lambda entries: next(e for e in entries if e & 7 == 6)),
        InvalidImage,
        "overlaps",
    ),
    (
        "block past the end",
        bat_entry(4, lambda e: (200 * MiB) | 6),
        InvalidImage,
        "truncated",
    ),
    (
        "block offset beyond any file",
        bat_entry(4, lambda e: (1 << 63) | 6),
        InvalidImage,
        "past any possible file size",
    ),
    ("truncated in data", lambda im: im[: len(im) - 2 * MiB], InvalidImage, "truncated"),
    ("truncated before the BAT", lambda im: im[: 300 * KiB], InvalidImage, "truncated"),
]


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed(
    dynamic: bytes, change: Callable[[bytes], bytes], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        run_null(VhdxConverter, change(dynamic), seed=9)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz(small: bytes, data: st.DataObject) -> None:
    table = regions(small)
    hot = [(0, 8), (64 * KiB, 128), (128 * KiB, 128), (192 * KiB, 256)] + [
        (offset, 1024) for _, offset, _ in table.values()
    ]
    blob = fuzz_image(data, small, hot)
    fuzz_run(VhdxConverter, blob, data.draw(st.integers(0, 1000), label="seed"))
