"""PersistentVolumeClaim storage: raw disk content into a sparse file or a block device.

A filesystem claim gets `disk.img`: written under a temporary name in the claim directory,
all-zero ranges left as holes, truncated to the exact virtual size, fsynced, then renamed
over `disk.img`, so a failed or refused transfer never leaves half-written data behind and
never touches what was stored before. A block claim (a block device, or a pre-sized file
given by path) is written in place; its zero ranges, the ranges a converter skips (a
qcow2's unallocated clusters) and the tail past the image are explicitly zeroed, since the
old contents are still there. Both are `RawTarget`s (importer.formats.base); a filesystem
claim can tell its extents too.

Both can be flushed and reopened, for a transfer that continues in another process from a
snapshot (`PvcSink.snapshot`, `PvcSink.resume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from importer.directio import is_direct_writable, open_direct
from importer.errors import ImageTooLarge, ProvisioningFailed, StorageFull
from importer.formats.base import Buffer, Converter, Extent, ImageInfo, Limits
from importer.formats.snapshot import state_metadata
from importer.sinks.decode import DecodeLane
from importer.writeback import WRITEBACK_EVERY, start_writeback

if TYPE_CHECKING:
    from importer.pipeline import TransferResult

# Granularity of hole detection: an all-zero run of this size is not written.
ZERO_GRANULE = 64 * 1024
_ZERO = bytes(ZERO_GRANULE)
_PROBE = 16

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLKGETSIZE64 = 0x80081272
_BLKZEROOUT = 0x127F

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def is_zero(view: memoryview) -> bool:
    """True when every byte of the view is zero (fast on non-zero data: probes first)."""
    n = len(view)
    if n > _PROBE and view[:_PROBE].tobytes() != _ZERO[:_PROBE]:
        return False
    if n <= ZERO_GRANULE:
        return view.tobytes() == _ZERO[:n]
    return all(
        view[i : i + ZERO_GRANULE].tobytes() == _ZERO[: min(ZERO_GRANULE, n - i)]
        for i in range(0, n, ZERO_GRANULE)
    )


def data_runs(offset: int, data: Buffer) -> list[tuple[int, memoryview]]:
    """Splits a write into its non-zero runs, at ZERO_GRANULE granularity (file-aligned)."""
    view = memoryview(data).cast("B")
    runs: list[tuple[int, memoryview]] = []
    start: int | None = None
    pos = 0
    n = len(view)
    while pos < n:
        # Align granules to file offsets so holes line up with filesystem blocks.
        end = min(n, pos + ZERO_GRANULE - (offset + pos) % ZERO_GRANULE)
        if is_zero(view[pos:end]):
            if start is not None:
                runs.append((offset + start, view[start:pos]))
                start = None
        elif start is None:
            start = pos
        pos = end
    if start is not None:
        runs.append((offset + start, view[start:n]))
    return runs


def _raise_os_error(exc: OSError, what: str) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFull(f"the storage is full while {what}") from exc
    raise ProvisioningFailed(f"{what} failed: {exc.strerror}") from exc


def _check_capacity(size: int, capacity: int | None, where: str) -> None:
    if capacity is not None and size > capacity:
        raise ImageTooLarge(
            f"the image needs {size} bytes but {where} holds at most {capacity} bytes"
        )


class _ClaimDescriptors:
    """A claim's data opened twice: `fd` through the page cache and `direct_fd` with
    O_DIRECT, where the storage takes it. Aligned writes go direct; what goes through the
    page cache is written back as it accumulates, so that the final fsync has little left."""

    fd: int = -1
    direct_fd: int | None = None
    _buffered = 0  # bytes written through the page cache since the last writeback

    def _open_direct(self, path: Path) -> None:
        try:
            self.direct_fd = open_direct(path)
        except OSError as exc:
            self.close()
            _raise_os_error(exc, f"opening {path}")

    def _pwrite(self, data: memoryview, offset: int) -> None:
        self._buffered += _pwrite_all(self.fd, data, offset, self.direct_fd)
        if self._buffered >= WRITEBACK_EVERY:
            start_writeback(self.fd)
            self._buffered = 0

    def close(self) -> None:
        """Lets go of the claim, leaving what was written in place (for a transfer that
        goes on elsewhere)."""
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileClaimTarget(_ClaimDescriptors):
    """A filesystem claim: `disk.img` in the claim directory, raw and sparse."""

    def __init__(
        self, directory: Path, capacity: int | None = None, *, _reopen: bool = False
    ) -> None:
        self.directory = directory
        self.capacity = capacity
        self.path = directory / "disk.img"
        self.partial = directory / ".disk.img.partial"
        self.end = 0  # highest byte written + 1
        self.written = 0  # bytes that went to disk (holes excluded)
        self._named = _reopen  # the partial file's name is durable
        if _reopen:
            try:
                self.fd = os.open(self.partial, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise ValueError(f"{self.partial} is gone: the transfer cannot go on") from exc
            except OSError as exc:
                _raise_os_error(exc, f"opening {self.partial}")
        else:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                self.fd = os.open(self.partial, flags, 0o644)
            except OSError as exc:
                _raise_os_error(exc, f"creating {self.partial}")
        self._open_direct(self.partial)

    @classmethod
    def reopen(
        cls, directory: Path, capacity: int | None, state: dict[str, Any]
    ) -> FileClaimTarget:
        """The target of a transfer that goes on from `state` (see `state()`): the partial
        file as it is, not truncated. Raises ValueError if it is gone or was replaced."""
        if state.get("kind") != "file":
            raise ValueError(f"the state is not that of a file claim: {state!r}")
        target = cls(directory, capacity, _reopen=True)
        try:
            size = os.fstat(target.fd).st_size
            target.end = int(state["end"])
            target.written = int(state["written"])
            if size < int(state["size"]):
                raise ValueError(
                    f"{target.partial} holds {size} bytes, fewer than the {state['size']} "
                    "it held at the snapshot"
                )
        except (KeyError, TypeError, ValueError) as exc:
            target.close()
            raise ValueError(f"the file claim cannot be reopened: {exc}") from exc
        return target

    def state(self) -> dict[str, Any]:
        """The counters to reopen with (JSON-able); `sync()` makes the data durable."""
        return {
            "kind": "file",
            "capacity": self.capacity,
            "end": self.end,
            "written": self.written,
            "size": os.fstat(self.fd).st_size,
        }

    def flush(self) -> None:
        """Makes everything written so far durable, the partial file's name (and the claim
        directory's) included."""
        try:
            os.fdatasync(self.fd)
            if not self._named:
                _fsync_directory(self.directory)
                _fsync_directory(self.directory.parent)
                self._named = True
        except OSError as exc:
            _raise_os_error(exc, "syncing the image")

    def declare_size(self, virtual_size: int) -> None:
        _check_capacity(virtual_size, self.capacity, "the claim")

    def write(self, offset: int, data: Buffer) -> None:
        end = offset + len(data)
        _check_capacity(end, self.capacity, "the claim")
        try:
            for run_offset, run in data_runs(offset, data):
                self._pwrite(run, run_offset)
                self.written += len(run)
        except OSError as exc:
            _raise_os_error(exc, "writing the image")
        self.end = max(self.end, end)

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        _check_capacity(end, self.capacity, "the claim")
        # The partial file is new: nothing past the highest write holds data.
        stop = min(end, self.end)
        if offset < stop:
            try:
                _zero_range(self.fd, offset, stop - offset, device=False)
            except OSError as exc:
                _raise_os_error(exc, "zeroing the image")

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Data and holes of the partial file (SEEK_DATA, SEEK_HOLE); all of it is data
        where the filesystem cannot tell. Bytes past the file's end are a hole."""
        end = offset + length
        found: list[Extent] = []
        pos = offset
        try:
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: no data from here on
                        raise
                    data = end
                data = min(data, end)
                if data > pos:
                    found.append(Extent(pos, data - pos, False))
                if data >= end:
                    break
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
                found.append(Extent(data, hole - data, True))
                pos = hole
        except OSError as exc:
            _raise_os_error(exc, "reading the image's extents")
        return found

    def commit(self, virtual_size: int) -> None:
        """Exact size, durable, then visible as `disk.img`."""
        _check_capacity(virtual_size, self.capacity, "the claim")
        try:
            os.ftruncate(self.fd, virtual_size)
            os.fsync(self.fd)
            self.close()
            os.replace(self.partial, self.path)
            _fsync_directory(self.directory)
        except OSError as exc:
            _raise_os_error(exc, "finishing the image")

    def abort(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()

    @property
    def stored_bytes(self) -> int:
        st = os.stat(self.path)
        return st.st_blocks * 512


class BlockClaimTarget(_ClaimDescriptors):
    """A block claim: a block device or a pre-sized file, written in place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            st = os.fstat(self.fd)
        except OSError as exc:
            _raise_os_error(exc, f"opening the block claim {path}")
        self.is_device = stat.S_ISBLK(st.st_mode)
        if self.is_device:
            buf = fcntl.ioctl(self.fd, _BLKGETSIZE64, b"\0" * 8)
            self.capacity: int = struct.unpack("Q", buf)[0]
        else:
            self.capacity = st.st_size
        self.end = 0
        self.written = 0
        self._open_direct(path)

    @classmethod
    def reopen(cls, path: Path, state: dict[str, Any]) -> BlockClaimTarget:
        """The target of a transfer that goes on from `state` (see `state()`). Raises
        ValueError if the claim's size changed."""
        if state.get("kind") != "block":
            raise ValueError(f"the state is not that of a block claim: {state!r}")
        target = cls(path)
        try:
            if target.capacity != int(state["capacity"]):
                raise ValueError(
                    f"{path} holds {target.capacity} bytes, not {state['capacity']} as before"
                )
            target.end = int(state["end"])
            target.written = int(state["written"])
        except (KeyError, TypeError, ValueError) as exc:
            target.close()
            raise ValueError(f"the block claim cannot be reopened: {exc}") from exc
        return target

    def state(self) -> dict[str, Any]:
        """The counters to reopen with (JSON-able); `sync()` makes the data durable."""
        return {
            "kind": "block",
            "capacity": self.capacity,
            "end": self.end,
            "written": self.written,
        }

    def flush(self) -> None:
        """Makes everything written so far durable."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            _raise_os_error(exc, "syncing the image")

    def declare_size(self, virtual_size: int) -> None:
        _check_capacity(virtual_size, self.capacity, f"the block claim {self.path}")

    def write(self, offset: int, data: Buffer) -> None:
        end = offset + len(data)
        _check_capacity(end, self.capacity, f"the block claim {self.path}")
        # Zeroing starts where the furthest write so far ended: nothing was written in a
        # gap before this write, and the old contents are still there. So every byte up to
        # `end` is written or zeroed (a later write into the gap overwrites zeros).
        pos = min(offset, self.end)
        try:
            for run_offset, run in data_runs(offset, data):
                if run_offset > pos:
                    _zero_range(self.fd, pos, run_offset - pos, self.is_device)
                self._pwrite(run, run_offset)
                self.written += len(run)
                pos = run_offset + len(run)
            if end > pos:
                _zero_range(self.fd, pos, end - pos, self.is_device)
        except OSError as exc:
            _raise_os_error(exc, "writing the image")
        self.end = max(self.end, end)

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        _check_capacity(end, self.capacity, f"the block claim {self.path}")
        # As in `write`: the gap between the furthest write and this range holds old data.
        start = min(offset, self.end)
        try:
            _zero_range(self.fd, start, end - start, self.is_device)
        except OSError as exc:
            _raise_os_error(exc, "zeroing the image")
        self.end = max(self.end, end)

    def commit(self, virtual_size: int) -> None:
        """Zero the tail past the image (stale data from before) and make it durable."""
        _check_capacity(virtual_size, self.capacity, f"the block claim {self.path}")
        try:
            if self.capacity > self.end:
                _zero_range(self.fd, self.end, self.capacity - self.end, self.is_device)
            os.fsync(self.fd)
            self.close()
        except OSError as exc:
            _raise_os_error(exc, "finishing the image")

    def abort(self) -> None:
        self.close()

    @property
    def stored_bytes(self) -> int:
        return self.capacity


def _zero_range(fd: int, offset: int, length: int, device: bool) -> None:
    """Zeroes a range in place: BLKZEROOUT on a block device, a hole punched in a file,
    zeros written where neither is supported."""
    if device:
        try:
            fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError:
            pass
    else:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(fd, mode, offset, length) == 0:
            return
    for pos in range(offset, offset + length, ZERO_GRANULE):
        _pwrite_all(fd, memoryview(_ZERO)[: min(ZERO_GRANULE, offset + length - pos)], pos)


def _fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _pwrite_all(fd: int, data: memoryview, offset: int, direct_fd: int | None = None) -> int:
    """Writes all of `data`, directly when `direct_fd` is given and the write is aligned;
    returns how many bytes went through the page cache."""
    if direct_fd is not None and is_direct_writable(offset, data):
        written = os.pwrite(direct_fd, data, offset)
        data = data[written:]
        offset += written
    buffered = len(data)
    while len(data):
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written
    return buffered


ClaimTarget = FileClaimTarget | BlockClaimTarget


class PvcSink:
    """Pipeline sink for PersistentVolumeClaim storage: decode to raw, write, commit."""

    def __init__(self, target: ClaimTarget, decoder: Converter) -> None:
        self.target = target
        self.decode = DecodeLane(decoder)

    def lanes(self) -> list[DecodeLane]:
        return [self.decode]

    def image_info(self) -> ImageInfo:
        return self.decode.image_info()

    async def commit(self, result: TransferResult) -> None:
        await asyncio.to_thread(self.target.commit, result.image.virtual_size)
        result.stored_bytes = self.target.stored_bytes
        result.written_bytes = self.target.written

    async def abort(self) -> None:
        await asyncio.to_thread(self.decode.close)
        await asyncio.to_thread(self.target.abort)

    def snapshot(self) -> bytes | None:
        """Everything needed to continue this transfer in another process from the number
        of bytes fed so far: the decoder's state with its stream offset (`decode.offset`),
        and the target's counters. Before it returns, the target's data and the spill files
        are durable; the caller then stores the state durably. Only while the lane is idle
        (between two blocks). None when the stream cannot be saved (a compressed wrapper,
        see importer.formats.snapshot)."""
        self.decode.settle()  # before the target's counters are read: it may still write
        state = self.decode.snapshot({"target": self.target.state()})
        if state is not None:
            self.target.flush()
        return state

    @classmethod
    def resume(cls, state: bytes, location: Path, limits: Limits) -> PvcSink:
        """The sink of a `snapshot`, on the claim it was taken on: the directory of a
        filesystem claim, or the path of a block claim. It expects the bytes from
        `decode.offset` on. Raises ValueError if the state cannot be used (the transfer
        must then start over)."""
        saved = state_metadata(state)["extra"].get("target")
        if not isinstance(saved, dict):
            raise ValueError("the state holds no claim target")
        target: ClaimTarget
        if saved.get("kind") == "block":
            target = BlockClaimTarget.reopen(Path(location), saved)
        else:
            target = FileClaimTarget.reopen(Path(location), saved.get("capacity"), saved)
        try:
            lane = DecodeLane.resume(state, target, limits)
        except BaseException:
            target.close()
            raise
        sink = cls(target, lane.decoder)
        sink.decode = lane
        return sink
