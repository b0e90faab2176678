"""VHD (Virtual PC / Hyper-V "vpc"): fixed and dynamic disks.

A fixed VHD is the raw disk followed by a 512-byte footer; the decoder streams it as raw and
asks `fixed_vhd_size` about the last 512 bytes. A dynamic VHD is: a copy of the footer at
offset 0, a dynamic disk header (`cxsparse`), the block allocation table (BAT), then blocks,
each a sector bitmap followed by the block's data, and the footer again at the end.

The virtual size follows qemu's rule (block/vpc.c, as of QEMU 10): images made by Virtual PC
(creator "vpc ") or by old qemu ("qemu") use the CHS geometry of the footer, unless the
geometry is the maximum one (65535/16/255); every other creator (Hyper-V "win ", "qem2",
disk2vhd, XenServer, Azure, ...) uses the footer's current size. For the creators qemu 7.2
lists this is the same size; for creators it does not list (Azure, VirtualBox) QEMU 10 and
we use the current size, where 7.2 would cut the disk to the geometry's size.

Unlike qemu, which reads whole blocks, we honour the sector bitmap: a sector whose bit is
clear reads as zeros, as the VHD specification says. Images written by qemu or Hyper-V set
the bits of every written sector, so the output is the same.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from typing import Final

from importer.errors import ImageTooLarge, InvalidImage
from importer.formats.base import Limits, RawTarget
from importer.formats.claims import Claim, ClaimSource, LayoutConverter, RunMap, capture_claim

FOOTER_SIZE: Final = 512
DYNAMIC_HEADER_SIZE: Final = 1024
SECTOR: Final = 512

DISK_FIXED: Final = 2
DISK_DYNAMIC: Final = 3
DISK_DIFFERENCING: Final = 4

# qemu refuses VHD disks over 2040 GiB.
MAX_SECTORS: Final = 0xFF000000
MAX_GEOMETRY: Final = 65535 * 16 * 255
CHS_CREATORS: Final = (b"vpc ", b"qemu")

MIN_BLOCK_SIZE: Final = 512
MAX_BLOCK_SIZE: Final = 256 << 20
# A BAT larger than this (64 MiB of entries) is not a disk anyone makes.
MAX_BAT_ENTRIES: Final = 16 << 20
UNALLOCATED: Final = 0xFFFFFFFF

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_DYNAMIC = struct.Struct(">8sQQIIII16sI")


def vhd_checksum(data: bytes, checksum_offset: int) -> int:
    """One's complement of the byte sum, with the checksum field counted as zero."""
    total = sum(data) - sum(data[checksum_offset : checksum_offset + 4])
    return ~total & 0xFFFFFFFF


class Footer:
    """The 512-byte hard disk footer."""

    def __init__(self, data: bytes) -> None:
        (
            self.cookie,
            self.features,
            self.version,
            self.data_offset,
            _timestamp,
            self.creator_app,
            _creator_version,
            _creator_os,
            _original_size,
            self.current_size,
            self.cylinders,
            self.heads,
            self.sectors_per_track,
            self.disk_type,
            self.checksum,
            _uuid,
            _saved_state,
        ) = _FOOTER.unpack_from(data)
        self.checksum_ok = vhd_checksum(data[:FOOTER_SIZE], 64) == self.checksum

    @property
    def virtual_size(self) -> int:
        chs: int = self.cylinders * self.heads * self.sectors_per_track
        if self.creator_app in CHS_CREATORS and chs != MAX_GEOMETRY:
            return chs * SECTOR
        size: int = self.current_size
        return size // SECTOR * SECTOR


def fixed_vhd_size(footer: bytes) -> int | None:
    """The virtual size, if these (last 512) bytes of a stream are a fixed-disk VHD footer
    with a correct checksum; else None. The size is the one qemu uses (see the module
    docstring); the raw data before the footer holds the disk from offset 0."""
    if len(footer) != FOOTER_SIZE or footer[:8] != b"conectix":
        return None
    parsed = Footer(bytes(footer))
    if not parsed.checksum_ok or parsed.disk_type != DISK_FIXED:
        return None
    size = parsed.virtual_size
    if size > MAX_SECTORS * SECTOR:
        return None
    return size


class VhdConverter(LayoutConverter):
    """Dynamic VHD: a stream that starts with the footer copy (`conectix`)."""

    format = "vhd"

    def __init__(self, target: RawTarget, limits: Limits) -> None:
        super().__init__(target, limits)
        self.footer: Footer | None = None
        self.block_size = 0
        self.bitmap_size = 0
        self.blocks = RunMap("vhd", merge=False)
        self.needed_entries = 0
        self.bat_data_end = 0  # end of the furthest block any BAT entry names
        self.tail = b""
        self.layout.capture(0, FOOTER_SIZE, "the footer copy", self._on_footer)

    def feed(self, data: memoryview) -> None:
        super().feed(data)
        if len(data) >= FOOTER_SIZE:
            self.tail = bytes(data[-FOOTER_SIZE:])
        else:
            self.tail = (self.tail + bytes(data))[-FOOTER_SIZE:]

    def check_end(self) -> None:
        if self.footer is None or not self.layout.complete:
            self.layout.finish()
            raise InvalidImage("vhd: the image ends before its block allocation table")
        end = self.layout.pos
        if self.bat_data_end > end:
            raise InvalidImage(
                f"vhd: a BAT entry points at a block ending at {self.bat_data_end:#x}, past "
                f"the end of the image ({end:#x}): the image is truncated or its BAT corrupt"
            )
        self.layout.finish()
        self._check_footer()

    # -- structures, in stream order ----------------------------------------------------

    def _on_footer(self, data: bytes) -> None:
        footer = Footer(data)
        if footer.cookie != b"conectix":
            raise InvalidImage("vhd: no footer copy (`conectix`) at offset 0")
        if not footer.checksum_ok:
            raise InvalidImage(
                f"vhd: footer checksum mismatch (stored {footer.checksum:#010x}, "
                f"computed {vhd_checksum(data, 64):#010x})"
            )
        if footer.disk_type == DISK_DIFFERENCING:
            raise InvalidImage("vhd: differencing disks (with a parent disk) are not accepted")
        if footer.disk_type == DISK_FIXED:
            raise InvalidImage(
                "vhd: the footer at offset 0 describes a fixed disk, which has no footer there"
            )
        if footer.disk_type != DISK_DYNAMIC:
            raise InvalidImage(f"vhd: unknown disk type {footer.disk_type}")
        size = footer.virtual_size
        if size > MAX_SECTORS * SECTOR:
            raise InvalidImage(
                f"vhd: virtual size {size} bytes exceeds the VHD maximum of 2040 GiB"
            )
        if size > self.limits.max_virtual_size:
            raise ImageTooLarge(
                f"vhd: virtual size {size} bytes exceeds the limit of "
                f"{self.limits.max_virtual_size} bytes"
            )
        self.target.declare_size(size)
        if footer.data_offset < FOOTER_SIZE or footer.data_offset >= 1 << 62:
            raise InvalidImage(
                f"vhd: dynamic header offset {footer.data_offset:#x} lies inside the footer copy "
                "or past any sane file size"
            )
        self.footer = footer
        self.virtual_size = size
        self.layout.capture(
            footer.data_offset, DYNAMIC_HEADER_SIZE, "the dynamic disk header", self._on_header
        )

    def _on_header(self, data: bytes) -> None:
        cookie, _next, table_offset, version, entries, block_size, checksum, _parent, _ts = (
            _DYNAMIC.unpack_from(data)
        )
        if cookie != b"cxsparse":
            raise InvalidImage("vhd: the dynamic disk header has no `cxsparse` cookie")
        if vhd_checksum(data, 36) != checksum:
            raise InvalidImage(
                f"vhd: dynamic header checksum mismatch (stored {checksum:#010x}, "
                f"computed {vhd_checksum(data, 36):#010x})"
            )
        if version != 0x00010000:
            raise InvalidImage(f"vhd: unknown dynamic header version {version:#x}")
        if (
            block_size < MIN_BLOCK_SIZE
            or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)
        ):
            raise InvalidImage(
                f"vhd: block size {block_size} is not a power of two between "
                f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes"
            )
        needed = -(-self.virtual_size // block_size)
        if entries < needed:
            raise InvalidImage(
                f"vhd: the BAT has {entries} entries but the disk needs {needed} blocks "
                f"of {block_size} bytes"
            )
        if entries > max(needed, MAX_BAT_ENTRIES):
            raise InvalidImage(f"vhd: the BAT has an absurd number of entries ({entries})")
        if table_offset % SECTOR or table_offset >= 1 << 62:
            raise InvalidImage(f"vhd: BAT offset {table_offset:#x} is not a sane sector offset")
        self.block_size = block_size
        self.bitmap_size = -(-(block_size // SECTOR) // (8 * SECTOR)) * SECTOR
        self.needed_entries = needed
        self.layout.stream(
            table_offset,
            entries * 4,
            "the block allocation table",
            4,
            self._on_bat,
            self._on_bat_end,
        )

    def _on_bat(self, rel: int, piece: memoryview | bytes) -> None:
        if piece == b"\xff" * len(piece):
            return
        first = rel // 4
        entries = struct.unpack(f">{len(piece) // 4}I", piece)
        span = self.bitmap_size + self.block_size
        for i, entry in enumerate(entries, first):
            if entry == UNALLOCATED:
                continue
            start = entry * SECTOR
            self.bat_data_end = max(self.bat_data_end, start + span)
            if i < self.needed_entries:
                self.blocks.add(start, i * self.block_size, span)

    def _on_bat_end(self) -> None:
        self.layout.add_sorted(ClaimSource(self.blocks.in_stream_order(), self._bitmap_claim))
        self.layout.complete = True

    def _bitmap_claim(self, block: tuple[int, int, int]) -> Claim:
        start, guest, _span = block
        return capture_claim(
            start,
            self.bitmap_size,
            f"the sector bitmap of block {guest // self.block_size}",
            functools.partial(self._place_present_sectors, start + self.bitmap_size, guest),
        )

    def _place_present_sectors(self, data_start: int, guest: int, bitmap: bytes) -> None:
        sectors = self.block_size // SECTOR
        visible = min(self.block_size, self.virtual_size - guest)
        block = guest // self.block_size
        for first, count in sector_runs(bitmap, sectors):
            offset = first * SECTOR
            if offset >= visible:
                break
            length = min(count * SECTOR, visible - offset)
            self.layout.place(data_start + offset, length, guest + offset, f"data of block {block}")

    def _check_footer(self) -> None:
        end = self.layout.pos
        if end - FOOTER_SIZE < self.layout.claimed_end or len(self.tail) < FOOTER_SIZE:
            raise InvalidImage("vhd: the image is truncated: no footer after the last block")
        footer = Footer(self.tail)
        if footer.cookie != b"conectix" or not footer.checksum_ok:
            raise InvalidImage(
                "vhd: the image is truncated or corrupt: its last 512 bytes are not a valid footer"
            )
        assert self.footer is not None
        if (footer.disk_type, footer.current_size, footer.cylinders, footer.heads,
                footer.sectors_per_track) != (
            self.footer.disk_type, self.footer.current_size, self.footer.cylinders,
            self.footer.heads, self.footer.sectors_per_track,
        ):  # fmt: skip
            raise InvalidImage("vhd: the footer at the end disagrees with the copy at offset 0")


def sector_runs(bitmap: bytes, sectors: int) -> Iterator[tuple[int, int]]:
    """(first sector, count) of each run of set bits among the first `sectors` bits of the
    bitmap, most significant bit of each byte first."""
    whole = sectors // 8
    if bitmap[:whole] == b"\xff" * whole and _last_bits_set(bitmap, sectors):
        yield 0, sectors
        return
    run_start = -1
    for sector, present in _bits(bitmap, sectors):
        if present:
            if run_start < 0:
                run_start = sector
        elif run_start >= 0:
            yield run_start, sector - run_start
            run_start = -1
    if run_start >= 0:
        yield run_start, sectors - run_start


def _last_bits_set(bitmap: bytes, sectors: int) -> bool:
    rest = sectors % 8
    if not rest:
        return True
    mask = (0xFF00 >> rest) & 0xFF
    return bitmap[sectors // 8] & mask == mask


def _bits(bitmap: bytes, sectors: int) -> Iterator[tuple[int, bool]]:
    """(sector, bit) pairs, whole bytes of equal bits collapsed to their first sector."""
    for index in range(-(-sectors // 8)):
        byte = bitmap[index]
        base = index * 8
        if byte in (0, 0xFF) and base + 8 <= sectors:
            yield base, byte == 0xFF
            continue
        for bit in range(min(8, sectors - base)):
            yield base + bit, bool(byte & (0x80 >> bit))
