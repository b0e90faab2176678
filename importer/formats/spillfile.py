"""The side file of a spill: stream bytes held back until a table says where they go."""

from __future__ import annotations

import contextlib
import os
import tempfile

from importer.errors import ProvisioningFailed


class SpillFile:
    """A file in the spill directory, created on the first append, read back by position.

    It is deleted by `close()`, which every way out of a converter calls (or the garbage
    collector), unless a snapshot of the decoder refers to it (`persist`): then it stays,
    and whoever keeps the snapshot deletes it with it (see `importer.formats.snapshot`).
    Bytes once written are never rewritten, so a snapshot's view of the file (its name and
    the size it had) stays valid while the decoder goes on appending.
    """

    def __init__(self, directory: str | None, prefix: str = "spill-") -> None:
        self.directory = directory
        self.prefix = prefix
        self.end = 0
        self.path: str | None = None
        self.kept = False  # a snapshot refers to the file: close() leaves it in place
        self._fd = -1

    def append(self, view: memoryview) -> int:
        """Writes the bytes at the end; returns where they start."""
        position = self.end
        try:
            if self._fd < 0:
                fd, path = tempfile.mkstemp(dir=self.directory, prefix=self.prefix)
                self._fd, self.path = fd, os.path.abspath(path)
            offset = position
            while len(view):
                written = os.pwrite(self._fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise ProvisioningFailed(f"writing the spill file failed: {exc.strerror}") from exc
        self.end = offset
        return position

    def read(self, position: int, length: int) -> bytes:
        assert self._fd >= 0
        try:
            data = os.pread(self._fd, length, position)
        except OSError as exc:
            raise ProvisioningFailed(f"reading the spill file failed: {exc.strerror}") from exc
        if len(data) != length:
            raise ProvisioningFailed("the spill file is shorter than what was written to it")
        return data

    def persist(self) -> tuple[str, int] | None:
        """Makes what was written durable, name included, and keeps the file from being
        deleted by `close()`; returns its path and size (None while there is no file)."""
        if self._fd < 0:
            return None
        assert self.path is not None
        try:
            os.fdatasync(self._fd)
            if not self.kept:
                dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise ProvisioningFailed(f"syncing the spill file failed: {exc.strerror}") from exc
        self.kept = True
        return self.path, self.end

    @classmethod
    def reopen(cls, directory: str | None, prefix: str, path: str, end: int) -> SpillFile:
        """The file a snapshot refers to, to append to from `end` on (kept, like it)."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        if size < end:
            os.close(fd)
            raise ValueError(f"the spill file {path} holds {size} bytes, not {end}")
        spill = cls(directory, prefix)
        spill._fd, spill.path, spill.end, spill.kept = fd, path, end, True
        return spill

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if not self.kept and self.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        self.path = None
        self.kept = False
        self.end = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
