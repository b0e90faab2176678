"""Is a disk in use by another process? And holding it against writers while it is read.

A running VM's qemu announces the permissions it holds on an image file with open file
description (OFD) locks on single bytes: a shared lock on byte 100 + n when it holds
permission n, on byte 200 + n when it refuses to share it; permission 1 is "write". It
tests for conflicts by asking for an exclusive lock on the same byte. Other programs use a
whole-file POSIX write lock or an exclusive `flock`. All three count as "in use" here.

While a disk is read, we take the same locks a read-only qemu user that refuses to share
"write" would: a qemu that wants to write then fails to start, readers still can.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

QEMU_PERM_READ_BYTE = 100 + 0
QEMU_PERM_WRITE_BYTE = 100 + 1
QEMU_SHARE_WRITE_BYTE = 200 + 1

# struct flock on Linux x86_64/aarch64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (and padding).
_FLOCK = struct.Struct("hhqqi4x")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def _lock_request(kind: int, start: int, length: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)


def _conflicting_lock(fd: int, kind: int, start: int, length: int) -> bool:
    """True when some other open file holds a lock that conflicts with `kind` there."""
    answer = fcntl.fcntl(fd, _F_OFD_GETLK, _lock_request(kind, start, length))
    held: int = _FLOCK.unpack(answer)[0]
    return held != fcntl.F_UNLCK


def _exclusive_flock_held(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def in_use_by(fd: int) -> str | None:
    """Why the disk open at `fd` counts as in use, or None when it is free to read."""
    # First the write lock: it also covers qemu's byte, and a qemu holds only shared locks.
    if _conflicting_lock(fd, fcntl.F_RDLCK, 0, 0):
        return "another process holds a write lock on it"
    if _conflicting_lock(fd, fcntl.F_WRLCK, QEMU_PERM_WRITE_BYTE, 1):
        return "a qemu process holds it open for writing"
    if _exclusive_flock_held(fd):
        return "another process holds an exclusive lock on it"
    return None


def disk_in_use(path: str | os.PathLike[str]) -> str | None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return in_use_by(fd)
    finally:
        os.close(fd)


def hold_for_reading(fd: int) -> bool:
    """Announces a reader that does not share "write", for as long as `fd` stays open;
    False when a writer got there first (the caller then waits and tries again)."""
    try:
        for byte in (QEMU_PERM_READ_BYTE, QEMU_SHARE_WRITE_BYTE):
            fcntl.fcntl(fd, _F_OFD_SETLK, _lock_request(fcntl.F_RDLCK, byte, 1))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return in_use_by(fd) is None
