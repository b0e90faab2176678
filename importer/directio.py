"""Writes that bypass the page cache (O_DIRECT) when the buffer, offset and length allow.

A direct write goes from our buffer to the disk: the kernel does not copy the data into
the page cache (on these machines that copy cost more CPU than hashing the same bytes),
and nothing is left dirty for the final fsync. O_DIRECT needs the memory address, the file
offset and the length aligned to the device's logical block; 4096 covers 512-byte and
4K-sector devices alike. Anything else (a header, a short tail, a buffer of our own) is
written through the page cache on a second descriptor; the kernel keeps the two coherent.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

ALIGNMENT = 4096


def aligned_buffer(size: int) -> mmap.mmap:
    """A writable buffer whose start is page-aligned (anonymous memory)."""
    return mmap.mmap(-1, size)


def open_direct(path: Path | str) -> int | None:
    """A write descriptor with O_DIRECT on `path`, or None where the filesystem refuses
    it (tmpfs, some FUSE and network filesystems)."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        return os.open(path, os.O_WRONLY | direct | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def is_direct_writable(offset: int, data: memoryview) -> bool:
    """True when `data` may be written at `offset` with O_DIRECT."""
    n = data.nbytes
    if n == 0 or offset % ALIGNMENT or n % ALIGNMENT or data.readonly:
        return False
    address = ctypes.addressof(ctypes.c_char.from_buffer(data))
    return address % ALIGNMENT == 0
