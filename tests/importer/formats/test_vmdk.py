"""VMDK: monolithicSparse and streamOptimized converted on the fly, bad images refused."""

from __future__ import annotations

import struct
import subprocess
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
    vmware_stream_vmdk,
    write_base,
)

from importer.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from importer.formats.base import Limits, NullTarget
from importer.formats.vmdk import VmdkConverter, check_descriptor

SIZE = 24 * MiB + 3 * 512  # the last grain is partial
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
FIELDS = {  # name: (offset, struct format)
    "version": (4, "<I"),
    "flags": (8, "<I"),
    "capacity": (12, "<Q"),
    "grain": (20, "<Q"),
    "descriptor_offset": (28, "<Q"),
    "gtes": (44, "<I"),
    "gd_offset": (56, "<Q"),
    "compression": (77, "<H"),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vmdk")


@pytest.fixture(scope="module")
def base(workdir: Path) -> Path:
    return write_base(workdir / "base.raw", SIZE, seed=41)


@pytest.fixture(scope="module")
def sparse(workdir: Path, base: Path) -> bytes:
    return qemu_convert(base, workdir / "sparse.vmdk", "vmdk").read_bytes()


@pytest.fixture(scope="module")
def stream(workdir: Path, base: Path) -> bytes:
    return qemu_convert(
        base, workdir / "stream.vmdk", "vmdk", "subformat=streamOptimized"
    ).read_bytes()


@pytest.fixture(scope="module")
def vmware(workdir: Path, base: Path) -> Path:
    path = workdir / "vmware.vmdk"
    path.write_bytes(vmware_stream_vmdk(base.read_bytes()))
    return path


@pytest.fixture(scope="module")
def small(workdir: Path) -> dict[str, bytes]:
    raw = write_base(workdir / "small.raw", 2 * MiB, seed=42)
    return {
        "sparse": qemu_convert(raw, workdir / "small.vmdk", "vmdk").read_bytes(),
        "stream": qemu_convert(
            raw, workdir / "small-s.vmdk", "vmdk", "subformat=streamOptimized"
        ).read_bytes(),
        "vmware": vmware_stream_vmdk(raw.read_bytes()),
    }


def field(image: bytes, name: str) -> int:
    offset, fmt = FIELDS[name]
    return struct.unpack_from(fmt, image, offset)[0]


def set_field(name: str, value: int, at: int = 0) -> Callable[[bytes], bytes]:
    def change(image: bytes) -> bytes:
        offset, fmt = FIELDS[name]
        blob = bytearray(image)
        struct.pack_into(fmt, blob, (len(blob) + at if at < 0 else at) + offset, value)
        return bytes(blob)

    return change


def descriptor(image: bytes) -> str:
    start = field(image, "descriptor_offset") * 512
    return image[start : start + 20 * 512].split(b"\0", 1)[0].decode()


def with_descriptor(edit: Callable[[str], str]) -> Callable[[bytes], bytes]:
    def change(image: bytes) -> bytes:
        start = field(image, "descriptor_offset") * 512
        text = edit(descriptor(image)).encode()
        blob = bytearray(image)
        blob[start : start + 20 * 512] = text.ljust(20 * 512, b"\0")
        return bytes(blob)

    return change


def gd_and_tables(image: bytes) -> tuple[int, list[int]]:
    """(GD offset in bytes, GT sectors) of an image with its tables at the start."""
    gd = field(image, "gd_offset") * 512
    grains = -(-field(image, "capacity") // field(image, "grain"))
    count = -(-grains // field(image, "gtes"))
    return gd, list(struct.unpack_from(f"<{count}I", image, gd))


def gt_entry(index: int, value: Callable[[int], int]) -> Callable[[bytes], bytes]:
    """Changes the `index`-th allocated grain table entry."""

    def change(image: bytes) -> bytes:
        _, tables = gd_and_tables(image)
        blob = bytearray(image)
        seen = 0
        for table in tables:
            for i in range(512):
                at = table * 512 + 4 * i
                (entry,) = struct.unpack_from("<I", blob, at)
                if entry > 1:
                    if seen == index:
                        struct.pack_into("<I", blob, at, value(entry))
                        return bytes(blob)
                    seen += 1
        raise AssertionError("not enough allocated grains")

    return change


@pytest.mark.parametrize(
    "options",
    [(), ("subformat=streamOptimized",), ("compat6",), ("adapter_type=lsilogic",)],
    ids=["monolithicSparse", "streamOptimized", "compat6", "lsilogic"],
)
def test_matches_qemu(workdir: Path, base: Path, options: tuple[str, ...]) -> None:
    name = "-".join(options) or "default"
    image = qemu_convert(base, workdir / f"{name}.vmdk", "vmdk", *options)
    for seed in (1, 2):
        info, raw = convert_to_raw(VmdkConverter, image, workdir / f"o-{name}-{seed}", seed)
        assert info.format == "vmdk"
        assert info.virtual_size == qemu_virtual_size(image, "vmdk") == raw.stat().st_size == SIZE
        result = qemu_compare(raw, image, "vmdk")
        assert result.returncode == 0, result.stdout + result.stderr


def test_vmware_stream_with_tables_at_the_end(workdir: Path, base: Path, vmware: Path) -> None:
    for seed in (3, 4):
        info, raw = convert_to_raw(VmdkConverter, vmware, workdir / f"vmware-{seed}", seed)
        assert info.virtual_size == qemu_virtual_size(vmware, "vmdk") == SIZE
        assert qemu_compare(raw, vmware, "vmdk").returncode == 0
        assert qemu_compare(raw, base, "raw").returncode == 0


def test_tables_after_the_grains_go_through_the_spill(workdir: Path, sparse: bytes) -> None:
    """monolithicSparse with its grain directory and tables moved past the grains."""
    gd, tables = gd_and_tables(sparse)
    overhead = 128 * 512
    blob = bytearray(sparse)
    shift = (len(blob) - gd) // 512
    moved = bytearray(blob[gd:overhead])
    blob[gd:overhead] = bytes(overhead - gd)
    for i, table in enumerate(tables):
        struct.pack_into("<I", moved, 4 * i, table + shift if table else 0)
    blob += moved
    struct.pack_into("<Q", blob, FIELDS["gd_offset"][0], gd // 512 + shift)
    image = workdir / "tables-last.vmdk"
    image.write_bytes(blob)
    spill_dir = workdir / "spill"
    spill_dir.mkdir()
    limits = Limits(spill_memory=512 * 1024, spill_dir=str(spill_dir))
    raw, memory, side_file = convert_watching_spill(
        VmdkConverter, image, workdir / "tables-last", 5, limits
    )
    assert memory <= 512 * 1024 < side_file
    assert qemu_compare(raw, image, "vmdk").returncode == 0
    assert list(spill_dir.iterdir()) == []


def test_split_flat_and_differencing_disks_are_refused(workdir: Path, sparse: bytes) -> None:
    def create(name: str, *args: str) -> Path:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "vmdk", *args, str(workdir / name), "8M"],
            check=True,
        )
        return workdir / name

    split = create("split.vmdk", "-o", "subformat=twoGbMaxExtentSparse")
    with pytest.raises(InvalidImage, match=r"descriptor file \(createType twoGbMaxExtentSparse"):
        run_null(VmdkConverter, split.read_bytes())
    with pytest.raises(InvalidImage, match="one extent of a disk split"):
        run_null(VmdkConverter, (workdir / "split-s001.vmdk").read_bytes())
    flat = create("flat.vmdk", "-o", "subformat=monolithicFlat")
    with pytest.raises(InvalidImage, match="references other files"):
        run_null(VmdkConverter, flat.read_bytes())
    (workdir / "parent.vmdk").write_bytes(sparse)
    child = create("child.vmdk", "-b", str(workdir / "parent.vmdk"), "-F", "vmdk")
    with pytest.raises(InvalidImage, match="differencing"):
        run_null(VmdkConverter, child.read_bytes())


def test_descriptor_checks() -> None:
    plain = 'createType="monolithicSparse"\nparentCID=ffffffff\nRW 100 SPARSE "a.vmdk"\n'
    check_descriptor(plain)
    check_descriptor(plain.replace("monolithicSparse", "streamOptimized"))
    for text, message in [
        (plain.replace("ffffffff", "0badc0de"), "parentCID=0badc0de"),
        (plain + 'parentFileNameHint="base.vmdk"\n', "base.vmdk"),
        (plain.replace("monolithicSparse", "vmfs"), "references other files"),
        (plain.replace("monolithicSparse", "newKind"), "unknown createType"),
        (plain + 'RW 100 SPARSE "b.vmdk"\n', "2 extents"),
        (plain.replace("SPARSE", "FLAT"), "references other files"),
        ("# nothing\n", "one extent of a disk split"),
    ]:
        with pytest.raises(InvalidImage, match=message):
            check_descriptor(text)


def test_limits(sparse: bytes) -> None:
    with pytest.raises(ImageTooLarge, match="exceeds the limit"):
        VmdkConverter(NullTarget(), Limits(max_virtual_size=MiB)).feed(memoryview(sparse[:512]))
    with pytest.raises(ImageTooLarge):
        VmdkConverter(NullTarget(capacity=MiB), Limits()).feed(memoryview(sparse[:512]))


def _corrupt_first_grain(image: bytes) -> bytes:
    blob = bytearray(image)
    start = 128 * 512 + 12  # qemu's first grain follows the 128-sector overhead
    for i in range(40, 60):
        blob[start + i] ^= 0x55
    return bytes(blob)


@pytest.mark.parametrize("options", [(), ("subformat=streamOptimized",)])
def test_empty_disk(workdir: Path, options: tuple[str, ...]) -> None:
    image = empty_image(workdir, "vmdk", *options)
    info, raw = convert_to_raw(VmdkConverter, image, workdir / ("empty" + "-".join(options)), 1)
    assert info.virtual_size == qemu_virtual_size(image, "vmdk") == raw.stat().st_size
    assert raw.stat().st_blocks == 0
    assert qemu_compare(raw, image, "vmdk").returncode == 0


MALFORMED_SPARSE: list[tuple[str, Callable[[bytes], bytes], type[Exception], str]] = [
    ("version 4", set_field("version", 4), UnsupportedFormat, "version 4"),
    ("unknown flag", set_field("flags", 3 | 1 << 9), InvalidImage, "unknown header flags"),
    ("grain size 3", set_field("grain", 3), InvalidImage, "not a power of two"),
    ("grain size 1 GiB", set_field("grain", 1 << 21), InvalidImage, "not a power of two"),
    ("gtes per gt", set_field("gtes", 1024), InvalidImage, "1 to 512"),
    ("capacity 0", set_field("capacity", 0), InvalidImage, "capacity 0"),
    ("compression", set_field("compression", 2), UnsupportedFormat, "compression algorithm"),
    (
        "grain past the capacity",
        set_field("capacity", 1024),
        InvalidImage,
        "past the capacity",
    ),
    (
        "parent in the descriptor",
        with_descriptor(lambda d: d.replace("parentCID=ffffffff", "parentCID=12345678")),
        InvalidImage,
        "differencing",
    ),
    (
        "parent file name hint",
        with_descriptor(lambda d: d + 'parentFileNameHint="base.vmdk"\n'),
        InvalidImage,
        "base.vmdk",
    ),
    (
        "split createType",
        with_descriptor(lambda d: d.replace("monolithicSparse", "twoGbMaxExtentSparse")),
        InvalidImage,
        "references other files",
    ),
    (
        "extent in another file",
        with_descriptor(lambda d: d.replace("# The Disk", 'RW 8 FLAT "other.raw" 0\n# The Disk')),
        InvalidImage,
        "references other files",
    ),
    ("grain table entry into the descriptor", gt_entry(3, lambda e: 2), InvalidImage, "overlaps"),
    ("two grains share data", gt_entry(5, lambda e: e - 128), InvalidImage, "overlaps"),
    ("grain past the end", gt_entry(7, lambda e: e + 1_000_000), InvalidImage, "truncated"),
    ("truncated", lambda im: im[: len(im) - 100_000], InvalidImage, "truncated"),
    ("truncated in the tables", lambda im: im[: 30 * 512], InvalidImage, "truncated"),
    (
        "descriptor file",
        lambda im: b"# Disk DescriptorFile\n" + im[22:],
        InvalidImage,
        "descriptor",
    ),
    ("ESX sparse", lambda im: b"COWD" + im[4:], UnsupportedFormat, "COWD"),
]

MALFORMED_STREAM: list[tuple[str, Callable[[bytes], bytes], type[Exception], str]] = [
    ("corrupt grain", _corrupt_first_grain, InvalidImage, "does not inflate"),
    (
        "table and markers disagree",
        gt_entry(2, lambda e: e + 1000),
        InvalidImage,
        "do not match",
    ),
    (
        "grain marker past the capacity",
        set_field("capacity", 4096),
        InvalidImage,
        "past the capacity",
    ),
    (
        "markers without compression",
        lambda im: set_field("flags", 3 | 1 << 17)(set_field("compression", 0)(im)),
        UnsupportedFormat,
        "without",
    ),
    ("truncated in a grain", lambda im: im[: 128 * 512 + 3000], InvalidImage, "truncated"),
]

MALFORMED_VMWARE: list[tuple[str, Callable[[bytes], bytes], type[Exception], str]] = [
    ("no end-of-stream marker", lambda im: im[:-512], InvalidImage, "truncated"),
    ("data after the end", lambda im: im + bytes(512), InvalidImage, "does not end with"),
    (
        "footer disagrees",
        set_field("capacity", 2 * (SIZE // 512), at=-1024),
        InvalidImage,
        "footer does not repeat",
    ),
    (
        "footer names another directory",
        lambda im: set_field("gd_offset", field(im[-1024:], "gd_offset") - 1, at=-1024)(im),
        InvalidImage,
        "grain directory at sector",
    ),
    (
        "grain directory at the end without markers",
        lambda im: set_field("flags", 1)(set_field("compression", 0)(im)),
        InvalidImage,
        "no markers",
    ),
    ("cut before the footer", lambda im: im[:-1024], InvalidImage, "truncated"),
]


@pytest.mark.parametrize(
    ("image", "change", "error", "message"),
    [("sparse", *case[1:]) for case in MALFORMED_SPARSE]
    + [("stream", *case[1:]) for case in MALFORMED_STREAM]
    + [("vmware", *case[1:]) for case in MALFORMED_VMWARE],
    ids=[case[0] for case in MALFORMED_SPARSE + MALFORMED_STREAM + MALFORMED_VMWARE],
)
def test_malformed(
    request: pytest.FixtureRequest,
    image: str,
    change: Callable[[bytes], bytes],
    error: type[Exception],
    message: str,
) -> None:
    fixture = request.getfixturevalue(image)
    data = fixture.read_bytes() if isinstance(fixture, Path) else fixture
    with pytest.raises(error, match=message):
        run_null(VmdkConverter, change(data), seed=10)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz(small: dict[str, bytes], data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(small)), label="kind")
    image = small[kind]
    hot = [(0, 512), (512, 1024), (21 * 512, 8 * 512), (128 * 512, 1024), (len(image) - 2048, 2048)]
    blob = fuzz_image(data, image, hot)
    fuzz_run(VmdkConverter, blob, data.draw(st.integers(0, 1000), label="seed"))
