"""Shared helpers for the VMDK, VDI, VHD and VHDX converter tests."""

from __future__ import annotations

import contextlib
import random
import subprocess
from pathlib import Path

from feeding import feed_all
from feeding import random_pieces as pieces

from importer.formats.base import Converter, ImageInfo, Limits, NullTarget
from importer.sinks.pvc import FileClaimTarget

MiB = 1 << 20


def write_base(path: Path, size: int, seed: int) -> Path:
    """A raw disk with random data, zero runs, sparse holes and short sector-sized islands
    of data, so that every kind of block and partial block shows up in the images."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            kind = rnd.random()
            length = rnd.choice([512, 4096, 65536, 300_000, MiB, 3 * MiB])
            length = min(length, size - pos)
            if kind < 0.45:
                f.seek(pos)
                f.write(rnd.randbytes(length))
            elif kind < 0.6:
                f.seek(pos)
                f.write(bytes(length))  # explicit zeros
            elif kind < 0.7:
                f.seek(pos + rnd.randrange(0, max(1, length - 512)) // 512 * 512)
                f.write(rnd.randbytes(512))
            pos += length
        # something in the last sector, so truncation at the end shows
        f.seek(size - 512)
        f.write(rnd.randbytes(512))
    return path


def qemu_convert(src: Path, dst: Path, fmt: str, *options: str) -> Path:
    args = ["qemu-img", "convert", "-f", "raw", "-O", fmt]
    for option in options:
        args += ["-o", option]
    subprocess.run([*args, str(src), str(dst)], check=True, capture_output=True)
    return dst


def convert_to_raw(
    conv_class: type[Converter], image: Path, out_dir: Path, seed: int, limits: Limits | None = None
) -> tuple[ImageInfo, Path]:
    target = FileClaimTarget(out_dir)
    try:
        info = feed_all(conv_class(target, limits or Limits()), image.read_bytes(), seed)
        target.commit(info.virtual_size)
    except BaseException:
        target.abort()
        raise
    return info, target.path


def qemu_compare(raw: Path, image: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(image)],
        capture_output=True,
        text=True,
    )


def qemu_virtual_size(image: Path, fmt: str) -> int:
    import json

    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", fmt, str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(json.loads(out)["virtual-size"])


def run_null(conv_class: type[Converter], data: bytes, seed: int = 0) -> ImageInfo:
    """Drives a converter into a target that only checks sizes."""
    return feed_all(conv_class(NullTarget(), Limits()), data, seed)


def vmware_stream_vmdk(raw: bytes, grain_sectors: int = 128, gtes_per_gt: int = 512) -> bytes:
    """A streamOptimized VMDK laid out as VMware writes it: grains behind markers, each
    grain table behind a marker after its grains, then the grain directory, a footer with
    the real directory offset, and an end-of-stream marker. qemu reads it; it cannot write
    it."""
    import struct
    import zlib

    sector = 512
    capacity = len(raw) // sector
    grain_bytes = grain_sectors * sector
    grains = -(-capacity // grain_sectors)
    tables = -(-grains // gtes_per_gt)
    descriptor = (
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        'createType="streamOptimized"\n\n# Extent description\n'
        f'RDONLY {capacity} SPARSE "disk.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.adapterType = "lsilogic"\n'
    ).encode()

    def header(gd_offset: int) -> bytes:
        fields = struct.pack(
            "<4sIIQQQQIQQQB4sH",
            b"KDMV",
            3,
            0x30001,
            capacity,
            grain_sectors,
            1,
            2,
            gtes_per_gt,
            0,
            gd_offset,
            128,
            0,
            b"\n \r\n",
            1,
        )
        return fields.ljust(sector, b"\0")

    def pad(data: bytes) -> bytes:
        return data + bytes(-len(data) % sector)

    def meta_marker(sectors: int, kind: int) -> bytes:
        return struct.pack("<QII", sectors, 0, kind).ljust(sector, b"\0")

    out = bytearray(header(0xFFFFFFFFFFFFFFFF))
    out += pad(descriptor)
    out += bytes(128 * sector - len(out))
    directory = [0] * tables
    for table in range(tables):
        entries = [0] * gtes_per_gt
        for i in range(gtes_per_gt):
            grain = table * gtes_per_gt + i
            if grain >= grains:
                break
            data = raw[grain * grain_bytes : (grain + 1) * grain_bytes]
            if not any(data):
                continue
            data = data.ljust(grain_bytes, b"\0")
            entries[i] = len(out) // sector
            compressed = zlib.compress(data)
            out += pad(struct.pack("<QI", grain * grain_sectors, len(compressed)) + compressed)
        if any(entries):
            gt_bytes = pad(struct.pack(f"<{gtes_per_gt}I", *entries))
            out += meta_marker(len(gt_bytes) // sector, 1)
            directory[table] = len(out) // sector
            out += gt_bytes
    gd_bytes = pad(struct.pack(f"<{tables}I", *directory))
    out += meta_marker(len(gd_bytes) // sector, 2)
    gd_sector = len(out) // sector
    out += gd_bytes
    out += meta_marker(1, 3)
    out += header(gd_sector)
    out += bytes(sector)  # end of stream
    return bytes(out)


def vhd_fix_footer(footer: bytearray) -> None:
    """Recomputes a VHD footer checksum in place."""
    import struct

    footer[64:68] = bytes(4)
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)


def fuzz_image(data, image: bytes, hot: list[tuple[int, int]]) -> bytes:  # type: ignore[no-untyped-def]
    """Draws a mutated copy of `image` from a hypothesis `data` object: byte changes, mostly
    in the `hot` (offset, length) ranges where headers and tables lie, and maybe a cut."""
    from hypothesis import strategies as st

    blob = bytearray(image)
    count = data.draw(st.integers(0, 6), label="mutations")
    for _ in range(count):
        if hot and data.draw(st.booleans(), label="in hot range"):
            start, length = data.draw(st.sampled_from(hot), label="range")
            offset = start + data.draw(st.integers(0, max(0, length - 1)), label="offset")
        else:
            offset = data.draw(st.integers(0, len(blob) - 1), label="offset")
        if offset < len(blob):
            blob[offset] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.integers(0, 3), label="cut?") == 0:
        blob = blob[: data.draw(st.integers(0, len(blob)), label="cut at")]
    return bytes(blob)


def fuzz_run(conv_class: type[Converter], blob: bytes, seed: int) -> None:
    """Runs a converter on fuzzed input: only TransferError subclasses may come out."""
    from importer.errors import TransferError

    with contextlib.suppress(TransferError):
        run_null(conv_class, blob, seed)


def empty_image(directory: Path, fmt: str, *options: str, size: int = 5 * MiB) -> Path:
    """An image of an all-zero disk: no data blocks at all."""
    raw = directory / f"zero-{size}.raw"
    if not raw.exists():
        with open(raw, "wb") as f:
            f.truncate(size)
    name = "-".join((fmt, *options)).replace("=", "_")
    return qemu_convert(raw, directory / f"zero-{name}", fmt, *options)


def convert_watching_spill(
    conv_class: type[Converter], image: Path, out_dir: Path, seed: int, limits: Limits
) -> tuple[Path, int, int]:
    """Converts like `convert_to_raw`; returns the raw file and the most the spill held in
    memory and in its side file, after checking that nothing is left held at the end."""
    rnd = random.Random(seed)
    target = FileClaimTarget(out_dir)
    converter = conv_class(target, limits)
    spill = converter.layout.spill  # type: ignore[attr-defined]
    most_memory = most_file = 0
    for piece in pieces(image.read_bytes(), rnd):
        converter.feed(piece)
        most_memory = max(most_memory, spill.memory)
        most_file = max(most_file, spill.file_bytes)
    info = converter.finish()
    assert (spill.memory, spill.file_bytes) == (0, 0)
    target.commit(info.virtual_size)
    return target.path, most_memory, most_file
