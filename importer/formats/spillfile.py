"""The side file of a spill: stream bytes held back until a table says where they go."""

from __future__ import annotations

import os
import tempfile
from typing import IO

from importer.errors import ProvisioningFailed


class SpillFile:
    """An unlinked temporary file, created on the first append, read back by position."""

    def __init__(self, directory: str | None, prefix: str = "spill-") -> None:
        self.directory = directory
        self.prefix = prefix
        self.end = 0
        self._file: IO[bytes] | None = None

    def append(self, view: memoryview) -> int:
        """Writes the bytes at the end; returns where they start."""
        position = self.end
        try:
            if self._file is None:
                # Unlinked at once; closed by close(), which every way out of a converter
                # calls, or by the garbage collector.
                self._file = tempfile.TemporaryFile(dir=self.directory, prefix=self.prefix)  # noqa: SIM115
            fd = self._file.fileno()
            offset = position
            while len(view):
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise ProvisioningFailed(f"writing the spill file failed: {exc.strerror}") from exc
        self.end = offset
        return position

    def read(self, position: int, length: int) -> bytes:
        assert self._file is not None
        try:
            data = os.pread(self._file.fileno(), length, position)
        except OSError as exc:
            raise ProvisioningFailed(f"reading the spill file failed: {exc.strerror}") from exc
        if len(data) != length:
            raise ProvisioningFailed("the spill file is shorter than what was written to it")
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.end = 0
