"""The image files scenarios send, made from a raw file: a qcow2 of it, and that qcow2
compressed. Each is made once per run, in the run's directory, and reused."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.units import MiB
from bench.workdir import SourceFile, hashed_file

_CHUNK = 4 * MiB


def qcow2_of(raw: SourceFile, path: Path) -> SourceFile:
    """`raw` as a qcow2 of twice its size, laid out as qemu writes images: tables first,
    then the data; half of the disk (and any zero cluster of `raw`) is unallocated."""
    if not path.exists():
        create = ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(2 * raw.size)]
        subprocess.run(create, check=True)
        convert = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2"]
        subprocess.run([*convert, str(raw.path), str(path)], check=True)
    return hashed_file(path)


@dataclass(frozen=True)
class Compressor:
    name: str  # as the server's format sniffing calls it: "xz", "zstd"
    suffix: str
    compress: tuple[str, ...]  # reads the file named last, writes FILE.suffix beside it
    decompress: tuple[str, ...]  # reads the file named last, writes to stdout


# xz: multi-threaded, so the file is made of independent blocks as xz >= 5.6 makes by
# default (24 MiB each, the default preset's block size), and decompressed with threads as
# xz >= 5.6 does by default. The preset is -0: the default -6 takes 15-30 minutes for 2 GiB
# on two cores here, and the preset changes how fast the file is made, hardly how fast it
# decompresses (1.73 s against 1.93 s for the same 128 MiB, single-threaded).
XZ = Compressor(
    "xz",
    ".xz",
    ("xz", "-T0", "-0", "--block-size=24MiB", "-k", "-f"),
    ("xz", "-d", "-T0", "-c"),
)
# zstd: its default level (3), multi-threaded; zstd decompresses in one thread.
ZSTD = Compressor("zstd", ".zst", ("zstd", "-T0", "-q", "-k", "-f"), ("zstd", "-d", "-q", "-c"))


def compressed_of(image: SourceFile, compressor: Compressor) -> SourceFile:
    """`image` compressed into IMAGE.suffix beside it (the original is kept)."""
    path = image.path.with_name(image.path.name + compressor.suffix)
    if not path.exists():
        subprocess.run([*compressor.compress, str(image.path)], check=True)
    return hashed_file(path)


@dataclass(frozen=True)
class StoredImage:
    """What a raw disk converted from an image made by `qcow2_of` holds: the raw file's
    bytes, then zeros up to the virtual size."""

    raw: SourceFile
    virtual_size: int

    def differs_from(self, disk: Path) -> str | None:
        """None when `disk` holds exactly that, else what is wrong. The zero tail is
        checked by its holes (SEEK_DATA) and by reading whatever data it has."""
        size = disk.stat().st_size if disk.exists() else None
        if size != self.virtual_size:
            return f"{size} bytes, not {self.virtual_size}"
        sha256 = hashlib.sha256()
        with open(disk, "rb") as f:
            left = self.raw.size
            while left and (chunk := f.read(min(_CHUNK, left))):
                sha256.update(chunk)
                left -= len(chunk)
            if sha256.hexdigest() != self.raw.sha256:
                return f"its first {self.raw.size} bytes differ from {self.raw.path.name}"
            offset = self.raw.size
            while offset < size:
                try:
                    offset = os.lseek(f.fileno(), offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break  # a hole up to the end
                    raise
                f.seek(offset)
                chunk = f.read(_CHUNK)
                if chunk.count(0) != len(chunk):
                    return f"non-zero bytes at {offset}, past the data"
                offset += len(chunk)
        return None
