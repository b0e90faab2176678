"""VDI: dynamic and static images converted on the fly, bad images refused."""

from __future__ import annotations

import struct
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
from importer.formats.base import Limits
from importer.formats.vdi import VdiConverter
from importer.sinks.pvc import FileClaimTarget

SIZE = 24 * MiB + 7 * 512  # not a whole number of blocks: the last block is partial


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vdi")


@pytest.fixture(scope="module")
def base(workdir: Path) -> Path:
    return write_base(workdir / "base.raw", SIZE, seed=21)


@pytest.fixture(scope="module")
def dynamic(workdir: Path, base: Path) -> bytes:
    return qemu_convert(base, workdir / "dynamic.vdi", "vdi").read_bytes()


@pytest.fixture(scope="module")
def small(workdir: Path) -> bytes:
    raw = write_base(workdir / "small.raw", 4 * MiB, seed=22)
    return qemu_convert(raw, workdir / "small.vdi", "vdi").read_bytes()


def header_field(fmt: str, offset: int, value: int) -> Callable[[bytes], bytes]:
    def change(image: bytes) -> bytes:
        blob = bytearray(image)
        struct.pack_into(fmt, blob, offset, value)
        return bytes(blob)

    return change


def block_map(image: bytes) -> tuple[int, list[int]]:
    (offset,) = struct.unpack_from("<I", image, 0x154)
    (count,) = struct.unpack_from("<I", image, 0x180)
    return offset, list(struct.unpack_from(f"<{count}I", image, offset))


def map_entry(
    index_of_allocated: int, value: Callable[[list[int]], int]
) -> Callable[[bytes], bytes]:
    def change(image: bytes) -> bytes:
        offset, entries = block_map(image)
        used = [i for i, e in enumerate(entries) if e < 0xFFFFFFFE]
        blob = bytearray(image)
        struct.pack_into("<I", blob, offset + 4 * used[index_of_allocated], value(entries))
        return bytes(blob)

    return change


@pytest.mark.parametrize("options", [(), ("static=on",)], ids=["dynamic", "static"])
def test_matches_qemu(workdir: Path, base: Path, options: tuple[str, ...]) -> None:
    image = qemu_convert(base, workdir / f"i{len(options)}.vdi", "vdi", *options)
    for seed in (1, 2):
        info, raw = convert_to_raw(VdiConverter, image, workdir / f"o{len(options)}{seed}", seed)
        assert info.format == "vdi"
        assert info.virtual_size == qemu_virtual_size(image, "vdi") == raw.stat().st_size == SIZE
        result = qemu_compare(raw, image, "vdi")
        assert result.returncode == 0, result.stdout + result.stderr


def test_odd_disk_size_rounds_up_like_qemu(workdir: Path, dynamic: bytes) -> None:
    image = workdir / "odd.vdi"
    image.write_bytes(header_field("<Q", 0x170, SIZE - 100)(dynamic))
    info, raw = convert_to_raw(VdiConverter, image, workdir / "odd", 3)
    assert info.virtual_size == SIZE == qemu_virtual_size(image, "vdi")
    assert qemu_compare(raw, image, "vdi").returncode == 0


def test_discarded_blocks_read_as_zeros(workdir: Path, dynamic: bytes) -> None:
    image = workdir / "discarded.vdi"
    image.write_bytes(map_entry(0, lambda entries: 0xFFFFFFFE)(dynamic))
    _, raw = convert_to_raw(VdiConverter, image, workdir / "discarded", 4)
    assert qemu_compare(raw, image, "vdi").returncode == 0


def test_block_map_after_data_goes_through_the_spill(workdir: Path, dynamic: bytes) -> None:
    """Data blocks before the block map wait in the spill (here mostly in the side file)."""
    map_offset, entries = block_map(dynamic)
    (data_offset,) = struct.unpack_from("<I", dynamic, 0x158)
    table = dynamic[map_offset : map_offset + 4 * len(entries)]
    blob = bytearray(dynamic)
    blob += bytes(-len(blob) % 512)
    new_offset = len(blob)
    blob += table
    struct.pack_into("<I", blob, 0x154, new_offset)
    assert data_offset < new_offset
    image = workdir / "map-last.vdi"
    image.write_bytes(blob)
    spill_dir = workdir / "spill"
    spill_dir.mkdir()
    limits = Limits(spill_memory=300 * 1024, spill_dir=str(spill_dir))
    raw, memory, side_file = convert_watching_spill(
        VdiConverter, image, workdir / "map-last", 5, limits
    )
    assert memory <= 300 * 1024 < side_file
    assert qemu_compare(raw, image, "vdi").returncode == 0
    assert list(spill_dir.iterdir()) == []


def test_capacity_of_the_target(workdir: Path, dynamic: bytes) -> None:
    target = FileClaimTarget(workdir / "claim", capacity=SIZE - 512)
    with pytest.raises(ImageTooLarge):
        VdiConverter(target, Limits()).feed(memoryview(dynamic))
    target.abort()
    with pytest.raises(ImageTooLarge, match="exceeds the limit"):
        VdiConverter(target, Limits(max_virtual_size=MiB)).feed(memoryview(dynamic[:512]))


def _parent(image: bytes) -> bytes:
    blob = bytearray(image)
    blob[0x1B8:0x1C8] = bytes(range(1, 17))
    return bytes(blob)


@pytest.mark.parametrize("options", [(), ("static=on",)])
def test_empty_disk(workdir: Path, options: tuple[str, ...]) -> None:
    image = empty_image(workdir, "vdi", *options)
    info, raw = convert_to_raw(VdiConverter, image, workdir / ("empty" + "-".join(options)), 1)
    assert info.virtual_size == qemu_virtual_size(image, "vdi") == raw.stat().st_size
    assert raw.stat().st_blocks == 0
    assert qemu_compare(raw, image, "vdi").returncode == 0


MALFORMED: list[tuple[str, Callable[[bytes], bytes], type[Exception], str]] = [
    ("signature", header_field("<I", 0x40, 0x12345678), InvalidImage, "bad signature"),
    ("version 1.0", header_field("<I", 0x44, 0x00010000), UnsupportedFormat, "version 1.0"),
    ("differencing", header_field("<I", 0x4C, 4), InvalidImage, "differencing"),
    ("undo", header_field("<I", 0x4C, 3), InvalidImage, "undo"),
    ("unknown type", header_field("<I", 0x4C, 9), InvalidImage, "unknown image type 9"),
    ("parent UUID", _parent, InvalidImage, "has a parent"),
    ("block size", header_field("<I", 0x178, 2 * MiB), UnsupportedFormat, "block size"),
    ("block extra", header_field("<I", 0x17C, 512), UnsupportedFormat, "extra bytes"),
    ("sector size", header_field("<I", 0x168, 4096), InvalidImage, "sector size"),
    ("unaligned map", header_field("<I", 0x154, 0x201), InvalidImage, "not sector-aligned"),
    ("disk bigger than map", header_field("<I", 0x180, 3), InvalidImage, "does not fit"),
    (
        "map entry out of range",
        map_entry(2, lambda entries: len(entries) + 5),
        InvalidImage,
        "past the 25 blocks",
    ),
    ("two blocks share data", map_entry(1, lambda entries: 0), InvalidImage, "overlaps"),
    (
        "map entry past the end",
        map_entry(3, lambda entries: len(entries) - 1),
        InvalidImage,
        "truncated",
    ),
    ("truncated in data", lambda im: im[: len(im) - 1_300_000], InvalidImage, "truncated"),
    ("truncated in the map", lambda im: im[:0x300], InvalidImage, "truncated"),
    ("truncated in the header", lambda im: im[:100], InvalidImage, "truncated"),
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
        run_null(VdiConverter, change(dynamic), seed=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz(small: bytes, data: st.DataObject) -> None:
    map_offset, entries = block_map(small)
    blob = fuzz_image(data, small, [(0, 512), (map_offset, 4 * len(entries))])
    fuzz_run(VdiConverter, blob, data.draw(st.integers(0, 1000), label="seed"))
