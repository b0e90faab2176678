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
        while chunk := await asyncio.to_thread(os.read, fd, READ_CHUNK):
            yield chunk
    except OSError as exc:
        raise SourceUnreachable(f"reading {path} failed: {exc.strerror}") from None
    finally:
        os.close(fd)
