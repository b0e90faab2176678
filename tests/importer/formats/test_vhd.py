"""VHD: dynamic images converted on the fly, fixed footers recognised, bad images refused."""

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
    vhd_fix_footer,
    write_base,
)

from importer.errors import ImageTooLarge, InvalidImage
from importer.formats.base import Limits, NullTarget
from importer.formats.vhd import VhdConverter, fixed_vhd_size, sector_runs
from importer.sinks.pvc import FileClaimTarget

SIZE = 24 * MiB


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vhd")


@pytest.fixture(scope="module")
def base(workdir: Path) -> Path:
    return write_base(workdir / "base.raw", SIZE, seed=11)


@pytest.fixture(scope="module")
def dynamic(workdir: Path, base: Path) -> Path:
    return qemu_convert(base, workdir / "dynamic.vhd", "vpc")


@pytest.fixture(scope="module")
def small(workdir: Path) -> bytes:
    raw = write_base(workdir / "small.raw", 5 * MiB, seed=12)
    return qemu_convert(raw, workdir / "small.vhd", "vpc").read_bytes()


def bat(image: bytes) -> tuple[int, list[int]]:
    """(BAT offset, entries) of a qemu-made dynamic VHD."""
    (table_offset,) = struct.unpack_from(">Q", image, 512 + 16)
    (count,) = struct.unpack_from(">I", image, 512 + 28)
    return table_offset, list(struct.unpack_from(f">{count}I", image, table_offset))


def with_footers(image: bytes, change: Callable[[bytearray], None]) -> bytes:
    blob = bytearray(image)
    for start in (0, len(blob) - 512):
        footer = bytearray(blob[start : start + 512])
        change(footer)
        vhd_fix_footer(footer)
        blob[start : start + 512] = footer
    return bytes(blob)


def with_dynamic_header(image: bytes, change: Callable[[bytearray], None]) -> bytes:
    blob = bytearray(image)
    header = bytearray(blob[512:1536])
    change(header)
    header[36:40] = bytes(4)
    struct.pack_into(">I", header, 36, ~sum(header) & 0xFFFFFFFF)
    blob[512:1536] = header
    return bytes(blob)


def with_bat_entry(image: bytes, index: int, value: int) -> bytes:
    table_offset, _ = bat(image)
    blob = bytearray(image)
    struct.pack_into(">I", blob, table_offset + 4 * index, value)
    return bytes(blob)


@pytest.mark.parametrize("options", [(), ("force_size=on",)], ids=["chs", "force_size"])
def test_dynamic_matches_qemu(workdir: Path, base: Path, options: tuple[str, ...]) -> None:
    image = qemu_convert(base, workdir / f"d{len(options)}.vhd", "vpc", *options)
    for seed in (1, 2):
        info, raw = convert_to_raw(
            VhdConverter, image, workdir / f"out-{len(options)}-{seed}", seed
        )
        assert info.format == "vhd"
        assert info.virtual_size == qemu_virtual_size(image, "vpc") == raw.stat().st_size
        result = qemu_compare(raw, image, "vpc")
        assert result.returncode == 0, result.stdout + result.stderr


def test_output_is_sparse(workdir: Path, dynamic: Path) -> None:
    _, raw = convert_to_raw(VhdConverter, dynamic, workdir / "sparse", 3)
    assert raw.stat().st_blocks * 512 < SIZE


def test_size_from_current_size_for_hyperv(workdir: Path, dynamic: Path) -> None:
    """Hyper-V ("win ") images use the footer's current size, here smaller than the
    geometry's, so the last block is cut; qemu agrees."""

    def hyperv(footer: bytearray) -> None:
        footer[28:32] = b"win "
        struct.pack_into(">Q", footer, 48, SIZE - MiB - 4096)

    image = workdir / "hyperv.vhd"
    image.write_bytes(with_footers(dynamic.read_bytes(), hyperv))
    info, raw = convert_to_raw(VhdConverter, image, workdir / "hyperv", 4)
    assert info.virtual_size == SIZE - MiB - 4096 == qemu_virtual_size(image, "vpc")
    assert qemu_compare(raw, image, "vpc").returncode == 0


def test_size_from_current_size_for_unlisted_creator(workdir: Path, dynamic: Path) -> None:
    """Creators outside qemu's CHS list (here Azure's "wa\\0\\0") use the current size."""

    def azure(footer: bytearray) -> None:
        footer[28:32] = b"wa\0\0"
        struct.pack_into(">Q", footer, 48, SIZE - MiB)

    info = run_null(VhdConverter, with_footers(dynamic.read_bytes(), azure))
    assert info.virtual_size == SIZE - MiB


def test_sector_bitmap_is_honoured(workdir: Path, base: Path, dynamic: Path) -> None:
    """Sectors whose bitmap bit is clear read as zeros (qemu ignores the bitmap)."""
    image = bytearray(dynamic.read_bytes())
    _, entries = bat(bytes(image))
    block = next(i for i, e in enumerate(entries) if e != 0xFFFFFFFF)
    bitmap_at = entries[block] * 512
    image[bitmap_at] = 0x0F  # sectors 0-3 of the block absent
    image[bitmap_at + 1] = 0xF0  # sectors 12-15 absent
    path = workdir / "bitmap.vhd"
    path.write_bytes(image)
    _, raw = convert_to_raw(VhdConverter, path, workdir / "bitmap", 5)
    expected = bytearray(base.read_bytes())
    guest = block * 2 * MiB
    expected[guest : guest + 4 * 512] = bytes(4 * 512)
    expected[guest + 12 * 512 : guest + 16 * 512] = bytes(4 * 512)
    out = raw.read_bytes()
    assert out[:SIZE] == expected
    assert not any(out[SIZE:])


def test_bat_after_the_blocks_goes_through_the_spill(workdir: Path, dynamic: Path) -> None:
    """Blocks before their BAT wait in the spill: memory first, then a side file."""
    image = bytearray(dynamic.read_bytes())
    table_offset, entries = bat(bytes(image))
    table = image[table_offset : table_offset + len(entries) * 4]
    image[table_offset : table_offset + len(table)] = bytes(len(table))
    body, footer = image[:-512], image[-512:]
    new_offset = len(body)
    moved = bytes(body + table + bytes(-len(table) % 512) + footer)
    moved = with_dynamic_header(moved, lambda h: struct.pack_into(">Q", h, 16, new_offset))
    path = workdir / "bat-last.vhd"
    path.write_bytes(moved)
    spill_dir = workdir / "spill"
    spill_dir.mkdir()
    limits = Limits(spill_memory=256 * 1024, spill_dir=str(spill_dir))
    raw, memory, side_file = convert_watching_spill(
        VhdConverter, path, workdir / "bat-last", 6, limits
    )
    assert memory <= 256 * 1024 < side_file
    assert qemu_compare(raw, path, "vpc").returncode == 0
    assert qemu_compare(raw, dynamic, "vpc").returncode == 0
    assert list(spill_dir.iterdir()) == []
    abandoned = VhdConverter(NullTarget(), limits)
    abandoned.feed(memoryview(moved)[: len(moved) // 2])
    assert abandoned.layout.spill.file_bytes > 0
    abandoned.close()
    assert (abandoned.layout.spill.memory, abandoned.layout.spill.file_bytes) == (0, 0)


def test_blocks_out_of_guest_order(workdir: Path, dynamic: Path) -> None:
    """Blocks stored in another order than the guest's (as Hyper-V allocates them)."""
    image = bytearray(dynamic.read_bytes())
    table_offset, entries = bat(bytes(image))
    used = [i for i, e in enumerate(entries) if e != 0xFFFFFFFF]
    span = 512 + 2 * MiB
    first, last = used[0], used[-1]
    a, b = entries[first] * 512, entries[last] * 512
    image[a : a + span], image[b : b + span] = image[b : b + span], image[a : a + span]
    struct.pack_into(">I", image, table_offset + 4 * first, entries[last])
    struct.pack_into(">I", image, table_offset + 4 * last, entries[first])
    path = workdir / "shuffled.vhd"
    path.write_bytes(image)
    _, raw = convert_to_raw(VhdConverter, path, workdir / "shuffled", 8)
    assert qemu_compare(raw, path, "vpc").returncode == 0
    assert qemu_compare(raw, dynamic, "vpc").returncode == 0


def test_capacity_of_the_target(workdir: Path, dynamic: Path) -> None:
    target = FileClaimTarget(workdir / "small-claim", capacity=SIZE // 2)
    with pytest.raises(ImageTooLarge):
        VhdConverter(target, Limits()).feed(memoryview(dynamic.read_bytes()))
    target.abort()


@pytest.mark.parametrize("options", [(), ("force_size=on",)], ids=["chs", "force_size"])
def test_fixed_footer(workdir: Path, base: Path, options: tuple[str, ...]) -> None:
    image = qemu_convert(
        base, workdir / f"fixed{len(options)}.vhd", "vpc", "subformat=fixed", *options
    )
    data = image.read_bytes()
    size = fixed_vhd_size(data[-512:])
    assert size == qemu_virtual_size(image, "vpc")
    raw = workdir / f"fixed{len(options)}.raw"
    raw.write_bytes(data[:size])
    assert qemu_compare(raw, image, "vpc").returncode == 0


def test_fixed_footer_refusals(workdir: Path, base: Path, dynamic: Path) -> None:
    image = qemu_convert(base, workdir / "fixed-bad.vhd", "vpc", "subformat=fixed")
    footer = bytearray(image.read_bytes()[-512:])
    assert fixed_vhd_size(bytes(footer)) is not None
    broken = bytearray(footer)
    broken[200] ^= 1
    assert fixed_vhd_size(bytes(broken)) is None  # checksum
    assert fixed_vhd_size(dynamic.read_bytes()[-512:]) is None  # a dynamic disk's footer
    assert fixed_vhd_size(bytes(footer[:-1])) is None
    assert fixed_vhd_size(bytes(512)) is None
    hyperv = bytearray(footer)
    hyperv[28:32] = b"win "
    struct.pack_into(">Q", hyperv, 48, 10 * MiB)
    vhd_fix_footer(hyperv)
    assert fixed_vhd_size(bytes(hyperv)) == 10 * MiB
    struct.pack_into(">Q", hyperv, 48, 3000 << 30)
    vhd_fix_footer(hyperv)
    assert fixed_vhd_size(bytes(hyperv)) is None  # over the 2040 GiB VHD maximum


def test_sector_runs() -> None:
    assert list(sector_runs(b"\xff" * 512, 4096)) == [(0, 4096)]
    assert list(sector_runs(bytes(512), 4096)) == []
    assert list(sector_runs(b"\x81\xff\x00\x01", 32)) == [(0, 1), (7, 9), (31, 1)]
    assert list(sector_runs(b"\xc0", 2)) == [(0, 2)]
    assert list(sector_runs(b"\x40", 2)) == [(1, 1)]


def _bad_bat_offset(image: bytes) -> bytes:
    return with_dynamic_header(image, lambda h: struct.pack_into(">Q", h, 16, 1 << 40))


def _duplicate_block(image: bytes) -> bytes:
    _, entries = bat(image)
    used = [i for i, e in enumerate(entries) if e != 0xFFFFFFFF]
    return with_bat_entry(image, used[1], entries[used[0]])


def _first_used(image: bytes) -> int:
    return next(i for i, e in enumerate(bat(image)[1]) if e != 0xFFFFFFFF)


def _flip(offset: int) -> Callable[[bytes], bytes]:
    def flip(image: bytes) -> bytes:
        blob = bytearray(image)
        blob[offset] ^= 0x40
        return bytes(blob)

    return flip


@pytest.mark.parametrize("options", [()])
def test_empty_disk(workdir: Path, options: tuple[str, ...]) -> None:
    image = empty_image(workdir, "vpc", *options)
    info, raw = convert_to_raw(VhdConverter, image, workdir / ("empty" + "-".join(options)), 1)
    assert info.virtual_size == qemu_virtual_size(image, "vpc") == raw.stat().st_size
    assert raw.stat().st_blocks == 0
    assert qemu_compare(raw, image, "vpc").returncode == 0


MALFORMED: list[tuple[str, Callable[[bytes], bytes], type[Exception], str]] = [
    ("footer checksum", _flip(100), InvalidImage, "footer checksum mismatch"),
    ("header checksum", _flip(512 + 100), InvalidImage, "dynamic header checksum mismatch"),
    ("header cookie", _flip(512), InvalidImage, "cxsparse"),
    (
        "differencing",
        lambda im: with_footers(im, lambda f: struct.pack_into(">I", f, 60, 4)),
        InvalidImage,
        "differencing",
    ),
    (
        "fixed type with a footer copy",
        lambda im: with_footers(im, lambda f: struct.pack_into(">I", f, 60, 2)),
        InvalidImage,
        "fixed disk",
    ),
    (
        "block size not a power of two",
        lambda im: with_dynamic_header(im, lambda h: struct.pack_into(">I", h, 32, 3 * MiB)),
        InvalidImage,
        "block size",
    ),
    (
        "BAT too small",
        lambda im: with_dynamic_header(im, lambda h: struct.pack_into(">I", h, 28, 2)),
        InvalidImage,
        r"the BAT has 2 entries but the disk needs \d+ blocks",
    ),
    ("BAT past the end", _bad_bat_offset, InvalidImage, "truncated"),
    (
        "BAT entry past the end",
        lambda im: with_bat_entry(im, 11, (len(im) + 10 * MiB) // 512),
        InvalidImage,
        "past the end",
    ),
    (
        "BAT entry into the header",
        lambda im: with_bat_entry(im, _first_used(im), 1),
        InvalidImage,
        "overlaps",
    ),
    ("two blocks share data", _duplicate_block, InvalidImage, "overlaps"),
    ("truncated in a block", lambda im: im[: len(im) - 700_000], InvalidImage, "past the end"),
    ("no footer at the end", lambda im: im[:-512], InvalidImage, "no footer"),
    ("cut inside the footer", lambda im: im[:-100], InvalidImage, "footer"),
    (
        "end footer disagrees",
        lambda im: (
            im[:-512] + with_footers(im[-512:], lambda f: struct.pack_into(">Q", f, 48, MiB))[-512:]
        ),
        InvalidImage,
        "disagrees",
    ),
    ("cut in the header", lambda im: im[:700], InvalidImage, "truncated"),
]


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed(
    dynamic: Path, change: Callable[[bytes], bytes], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        run_null(VhdConverter, change(dynamic.read_bytes()), seed=7)


def test_virtual_size_limit(dynamic: Path) -> None:
    converter = VhdConverter(FileClaimTarget.__new__(FileClaimTarget), Limits(max_virtual_size=MiB))
    with pytest.raises(ImageTooLarge, match="exceeds the limit"):
        converter.feed(memoryview(dynamic.read_bytes()[:4096]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz(small: bytes, data: st.DataObject) -> None:
    hot = [(0, 2048), (len(small) - 512, 512)] + [
        (entry * 512, 512) for entry in bat(small)[1] if entry != 0xFFFFFFFF
    ]
    blob = fuzz_image(data, small, hot)
    fuzz_run(VhdConverter, blob, data.draw(st.integers(0, 1000), label="seed"))


@settings(max_examples=50, deadline=None)
@given(blob=st.binary(min_size=0, max_size=4096), seed=st.integers(0, 100))
def test_fuzz_random_bytes(blob: bytes, seed: int) -> None:
    fuzz_run(VhdConverter, b"conectix" + blob, seed)
