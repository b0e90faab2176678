"""What every format converter is: a push parser from an image byte stream to raw writes.

The pipeline calls `feed` with consecutive pieces of the (already unwrapped) image stream,
in order, from one worker thread, then `finish` once at the end. A converter never seeks
in its input: it sees each byte once. It writes the guest-visible disk content to a
`RawTarget` at virtual offsets; ranges it never writes read as zeros (the target sees to
that, see `RawTarget`), so zero clusters and unallocated ranges need no write at all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol

from importer.errors import ImageTooLarge

Buffer = bytes | bytearray | memoryview

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# Largest piece an unwrapper (gzip, xz, zstd, bzip2) hands onward at once.
PIECE = 1 * MiB


@dataclass(frozen=True)
class ImageInfo:
    """What the stream turned out to be."""

    format: str  # qcow2|raw|iso|vmdk|vdi|vhd|vhdx
    virtual_size: int  # bytes of the guest-visible disk
    cdrom: bool = False
    # Wrappers taken off on the way in, outermost first: ("gzip", "tar"), ("xz",), ...
    wrappers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    """Bounds a converter must keep, whatever the input claims."""

    max_virtual_size: int = 16 * TiB
    # Data that arrives before the table that places it is held here, then in a side file.
    spill_memory: int = 64 * MiB
    spill_dir: str | None = None


class RawTarget(Protocol):
    """Where the raw disk content goes, in the shape of a storage backend: random-access
    writes, explicit zeroing and a flush.

    Every range below the highest byte written or zeroed that nothing wrote reads as
    zeros once the target is committed: a new sparse file has nothing there, and a target
    over old contents (a block device) zeroes such gaps itself, as writes pass them. So a
    converter skips what it knows to be zero, and calls `zero` only for a range it must
    clear explicitly (one it wrote before, or one past everything it writes); what that
    costs is the target's business (nothing, a hole punched, a zeroing command)."""

    def declare_size(self, virtual_size: int) -> None:
        """Announce the virtual size as soon as it is known; raises ImageTooLarge if it does
        not fit the claim or the configured limit."""

    def write(self, offset: int, data: Buffer) -> None:
        """Write guest bytes at a virtual offset. All-zero ranges may become holes.
        Raises ImageTooLarge past the capacity."""

    def zero(self, offset: int, length: int) -> None:
        """Make `length` bytes at a virtual offset read as zeros. Raises ImageTooLarge past
        the capacity."""

    def flush(self) -> None:
        """Make everything written and zeroed so far durable."""


@dataclass(frozen=True)
class Extent:
    """A range of a target, as the storage knows it: data, or a hole that reads as zeros."""

    offset: int
    length: int
    data: bool


class ExtentsTarget(RawTarget, Protocol):
    """A target whose storage can tell where its data and its holes are."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The data and holes of `length` bytes at `offset`, in order, covering them."""
        ...


class Converter(ABC):
    """Turns one image format, streamed once, into raw writes on a target."""

    format: ClassVar[str]

    def __init__(self, target: RawTarget, limits: Limits) -> None:
        self.target = target
        self.limits = limits

    @abstractmethod
    def feed(self, data: memoryview) -> None:
        """Consume the next bytes of the stream. The buffer is reused once this returns:
        copy whatever must be kept. Raises a TransferError subclass on bad input."""

    @abstractmethod
    def finish(self) -> ImageInfo:
        """The stream ended. Raises InvalidImage if it ended early or is inconsistent."""

    def close(self) -> None:  # noqa: B027 (optional hook: most converters hold nothing)
        """Releases what the converter holds (a spill file) when a transfer stops early.
        Safe to call more than once."""


class NullTarget:
    """A target that only checks sizes: for validating a stream stored elsewhere as is."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity

    def declare_size(self, virtual_size: int) -> None:
        if self.capacity is not None and virtual_size > self.capacity:
            raise ImageTooLarge(
                f"virtual size {virtual_size} bytes exceeds the limit of {self.capacity} bytes"
            )

    def write(self, offset: int, data: Buffer) -> None:
        self.declare_size(offset + len(data))

    def zero(self, offset: int, length: int) -> None:
        self.declare_size(offset + length)

    def flush(self) -> None:
        return None
