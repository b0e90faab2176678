"""An image in a local file or block device, read in large blocks off the event loop."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from importer.errors import SourceUnreachable

READ_CHUNK = 4 << 20


def source_length(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceUnreachable(f"cannot open {path}: {exc.strerror}") from None
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceUnreachable(f"cannot open {path}: {exc.strerror}") from None
    try:
        async for chunk in fd_chunks(fd, None, str(path)):
            yield chunk
    finally:
        os.close(fd)


async def fd_chunks(fd: int, length: int | None, name: str) -> AsyncIterator[bytes]:
    """The bytes of an open file from offset 0, `length` of them or up to its end."""
    offset = 0
    try:
        while length is None or offset < length:
            want = READ_CHUNK if length is None else min(READ_CHUNK, length - offset)
            chunk = await asyncio.to_thread(os.pread, fd, want, offset)
            if not chunk:
                break
            offset += len(chunk)
            yield chunk
    except OSError as exc:
        raise SourceUnreachable(f"reading {name} failed: {exc.strerror}") from None
    if length is not None and offset < length:
        raise SourceUnreachable(f"{name} ended after {offset} of {length} bytes")
