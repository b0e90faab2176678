"""Helpers for the sniff, unwrap, decoder, iso and qcow2 tests: test images built with
qemu-img, feeding in random pieces, and in-memory targets."""

from __future__ import annotations

import json
import random
import struct
import subprocess
from pathlib import Path

from feeding import feed_all

from importer.errors import ImageTooLarge
from importer.formats.base import Buffer, ImageInfo, Limits
from importer.formats.decoder import ImageDecoder
from importer.sinks.pvc import FileClaimTarget

MiB = 1 << 20


def make_base(path: Path, size: int, seed: int) -> Path:
    """A raw disk: random data, explicit zero runs, holes, lone sectors, and data in the
    last sector (so a cut-off end shows)."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            kind = rnd.random()
            length = min(size - pos, rnd.choice([512, 4096, 65536, 200_000, MiB, 2 * MiB]))
            if kind < 0.45:
                f.seek(pos)
                f.write(rnd.randbytes(length))
            elif kind < 0.6:
                f.seek(pos)
                f.write(bytes(length))
            elif kind < 0.7:
                f.seek(pos + rnd.randrange(0, max(1, length - 512)) // 512 * 512)
                f.write(rnd.randbytes(512))
            pos += length
        f.seek(size - 512)
        f.write(rnd.randbytes(512))
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True)


def qcow2_from(base: Path, dst: Path, *args: str) -> Path:
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *args, str(base), str(dst))
    return dst


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    run(*args, str(image))


def snapshot(image: Path, name: str) -> None:
    """An internal snapshot (the format given explicitly, as `snapshot` has no -f)."""
    run("qemu-img", "snapshot", "--image-opts", "-c", name, f"driver=qcow2,file.filename={image}")


def decode_to_file(
    image: Path, out_dir: Path, limits: Limits | None = None, seed: int = 0, **kwargs: str
) -> tuple[ImageInfo, Path]:
    target = FileClaimTarget(out_dir)
    decoder = ImageDecoder(target, limits or Limits(), **kwargs)
    try:
        info = feed_all(decoder, image.read_bytes(), seed)
    except BaseException:
        target.abort()
        raise
    target.commit(info.virtual_size)
    return info, target.path


def virtual_size(image: Path, fmt: str) -> int:
    info = json.loads(run("qemu-img", "info", "-f", fmt, "--output=json", str(image)).stdout)
    return info["virtual-size"]


def qemu_compare(raw: Path, image: Path, fmt: str) -> None:
    """Same content as qemu sees it, and exactly the virtual size."""
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(image)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert raw.stat().st_size == virtual_size(image, fmt)


class MemoryTarget:
    """A sparse in-memory target that checks every write lies within the declared size."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.declared: int | None = None
        self.blocks: dict[int, bytes] = {}
        self.written = 0

    def declare_size(self, virtual_size: int) -> None:
        if self.capacity is not None and virtual_size > self.capacity:
            raise ImageTooLarge(f"{virtual_size} > {self.capacity}")
        self.declared = virtual_size

    def write(self, offset: int, data: Buffer) -> None:
        data = bytes(data)
        end = offset + len(data)
        if self.capacity is not None and end > self.capacity:
            raise ImageTooLarge(f"write to {end} > {self.capacity}")
        if self.declared is not None:
            assert end <= self.declared, (offset, len(data), self.declared)
        self.blocks[offset] = data
        self.written += len(data)

    def image(self, size: int) -> bytes:
        out = bytearray(size)
        for offset, data in sorted(self.blocks.items()):
            out[offset : offset + len(data)] = data
        return bytes(out)


def read_header(data: Buffer) -> dict[str, int]:
    fields = struct.unpack_from(">4sIQIIQIIQQIIQ", data)
    names = [
        "magic",
        "version",
        "backing_file_offset",
        "backing_file_size",
        "cluster_bits",
        "size",
        "crypt_method",
        "l1_size",
        "l1_table_offset",
        "refcount_table_offset",
        "refcount_table_clusters",
        "nb_snapshots",
        "snapshots_offset",
    ]
    header = dict(zip(names, fields, strict=True))
    if header["version"] >= 3:
        extra = struct.unpack_from(">QQQII", data, 72)
        header.update(
            zip(
                ["incompatible", "compatible", "autoclear", "refcount_order", "header_length"],
                extra,
                strict=True,
            )
        )
    return header


def l1_entry(data: Buffer, index: int) -> int:
    header = read_header(data)
    return struct.unpack_from(">Q", data, header["l1_table_offset"] + 8 * index)[0]


OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def first_l2_entry_offset(data: Buffer, table: int = 0) -> int:
    """File offset of the first allocated entry of an L2 table (the first by default)."""
    header = read_header(data)
    width = 16 if header.get("incompatible", 0) & (1 << 4) else 8
    l2 = l1_entry(data, table) & OFFSET_MASK
    cluster = 1 << header["cluster_bits"]
    for pos in range(l2, l2 + cluster, width):
        if struct.unpack_from(">Q", data, pos)[0] & (OFFSET_MASK | 1 << 62):
            return pos
    raise AssertionError("the L2 table is empty")


def last_l1_index(data: Buffer) -> int:
    header = read_header(data)
    return max(i for i in range(header["l1_size"]) if l1_entry(data, i) & OFFSET_MASK)
