"""A small real filesystem for tests that fill a disk."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size: int) -> Iterator[Path]:
    """A loop-mounted ext4 of `size` bytes at `mount_point` (needs root)."""
    backing = mount_point.parent / f"{mount_point.name}.ext4"
    with open(backing, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True, capture_output=True)
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(backing), str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.fail(
            "the full-disk test loop-mounts a small ext4 and needs root for it (CI runs as "
            f"root): mount said: {mounted.stderr.strip()}"
        )
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
        backing.unlink(missing_ok=True)
