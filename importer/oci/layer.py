"""The DVCR layer: an uncompressed tar with `disk/` and one file, written on the fly.

A tar header needs the file's size first, so the size is known before the data (the
upload's Content-Length). The digest of the layer is computed as it is written.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from typing import Protocol

from importer.errors import ProvisioningFailed, TransferInterrupted

BLOCK = tarfile.BLOCKSIZE  # 512
DISK_DIR = "disk"
OWNER = 107  # qemu's uid and gid in the images that read DVCR
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
DEFAULT_FILENAME = "disk.img"


def safe_filename(name: str | None) -> str:
    """A file name for `disk/{name}`: the last path segment, with unusual characters
    replaced; `disk.img` when nothing usable is left."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _SAFE_NAME.sub("_", base).lstrip(".")
    return base[:200] or DEFAULT_FILENAME


def layer_head(filename: str, size: int) -> bytes:
    """Headers of the `disk/` directory and of `disk/{filename}` (PAX where sizes need it)."""
    directory = tarfile.TarInfo(DISK_DIR)
    directory.type = tarfile.DIRTYPE
    directory.mode = 0o755
    entry = tarfile.TarInfo(f"{DISK_DIR}/{filename}")
    entry.size = size
    entry.mode = 0o444
    for info in (directory, entry):
        info.uid = info.gid = OWNER
        info.uname = info.gname = ""
        info.mtime = 0
    return directory.tobuf(tarfile.PAX_FORMAT) + entry.tobuf(tarfile.PAX_FORMAT)


def layer_tail(size: int) -> bytes:
    """Padding of the file to a whole block, then the end-of-archive marker."""
    return bytes(-size % BLOCK) + bytes(2 * BLOCK)


def layer_size(filename: str, size: int) -> int:
    return len(layer_head(filename, size)) + size + len(layer_tail(size))


class BlobWriter(Protocol):
    """Where layer bytes go, called from a lane thread, in order."""

    def write(self, data: bytes | memoryview) -> None: ...


class LayerLane:
    """Pipeline lane: wraps the received bytes into the layer tar and writes it out."""

    name = "layer"

    def __init__(self, writer: BlobWriter, filename: str, size: int) -> None:
        self.writer = writer
        self.filename = filename
        self.size = size
        self.received = 0
        self.length = 0
        self._digest = hashlib.sha256()

    def _start(self) -> None:
        # The head is written from the lane's thread like everything else, never the loop's.
        if self.length == 0:
            self._emit(layer_head(self.filename, self.size))

    def _emit(self, data: bytes | memoryview) -> None:
        self._digest.update(data)
        self.writer.write(data)
        self.length += len(data)

    def update(self, data: memoryview) -> None:
        self._start()
        self.received += len(data)
        if self.received > self.size:
            raise ProvisioningFailed(
                f"received more than the {self.size} bytes announced for the image"
            )
        self._emit(data)

    def finish(self) -> None:
        if self.received != self.size:
            raise TransferInterrupted(
                f"the image ended after {self.received} of the {self.size} bytes announced"
            )
        self._start()
        self._emit(layer_tail(self.size))

    @property
    def digest(self) -> str:
        return "sha256:" + self._digest.hexdigest()
