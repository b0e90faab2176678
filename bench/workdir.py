"""The temporary directory of a run and the data it sends.

Everything a run writes (source data, nginx's body buffers and targets, our server's data
directory) lives under one directory, so all of it is on the same filesystem and disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.units import MiB, format_size

RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "overlay-tmpfs"})
_CHUNK = 4 * MiB


@dataclass(frozen=True)
class Mount:
    point: Path
    fstype: str
    device: str


def mount_of(path: Path) -> Mount:
    """The mount that holds `path` (longest matching mount point in mountinfo)."""
    target = path.resolve()
    best = Mount(Path("/"), "unknown", "unknown")
    best_len = -1
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        point = Path(fields[4].replace("\\040", " "))
        fstype, device = [*right.split(), "", ""][:2]
        if (target == point or point in target.parents) and len(str(point)) > best_len:
            best = Mount(point, fstype, device)
            best_len = len(str(point))
    return best


def default_base() -> Path:
    """The system temporary directory, unless it is in RAM; then the current directory."""
    tmp = Path(tempfile.gettempdir())
    if mount_of(tmp).fstype in RAM_FILESYSTEMS:
        return Path.cwd()
    return tmp


def make_workdir(base: Path | None, needed: int) -> Path:
    base = base or default_base()
    base.mkdir(parents=True, exist_ok=True)
    mount = mount_of(base)
    if mount.fstype in RAM_FILESYSTEMS:
        raise SystemExit(
            f"{base} is on {mount.fstype} (RAM): pick a directory on a disk with --tmp-dir"
        )
    free = shutil.disk_usage(base).free
    if free < needed:
        raise SystemExit(
            f"{base} has {format_size(free)} free, the run needs {format_size(needed)}"
        )
    return Path(tempfile.mkdtemp(prefix="dvcr-bench-", dir=base))


@dataclass(frozen=True)
class SourceFile:
    path: Path
    size: int
    sha256: str
    md5: str


def random_file(path: Path, size: int) -> SourceFile:
    """`size` random bytes (incompressible, no zero blocks), on disk and synced."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(_CHUNK, left))
            f.write(chunk)
            sha256.update(chunk)
            md5.update(chunk)
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return SourceFile(path, size, sha256.hexdigest(), md5.hexdigest())


def read_through(path: Path) -> None:
    """Reads a file whole, so that the next reader finds it in the page cache."""
    buf = bytearray(_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle() -> None:
    """Between runs: everything written so far reaches the disk before the next run."""
    os.sync()


def hashed_file(path: Path) -> SourceFile:
    """A SourceFile for a file that already exists (an image made from the random data)."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
    return SourceFile(path, path.stat().st_size, sha256.hexdigest(), md5.hexdigest())
