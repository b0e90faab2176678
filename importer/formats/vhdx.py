"""VHDX (Hyper-V), version 1: fixed and dynamic disks.

Layout: the file identifier (`vhdxfile`) at 0, two headers at 64 KiB and 128 KiB (the valid
one with the higher sequence number is current), the region table at 192 KiB naming the BAT
and metadata regions, which may lie anywhere in the file at 1 MiB boundaries. The metadata
region holds a table of items (block size, virtual disk size, sector sizes, ...); the BAT
holds one 64-bit entry per payload block, with one sector bitmap entry after every
`chunk_ratio` payload entries. Payload blocks may come before the tables that map them;
they wait in the layout's spill until the BAT arrives.

Refused: differencing disks (has-parent, partially present blocks), a log that needs
replaying, unknown required regions or metadata items, checksum mismatches.

The virtual size is the metadata's virtual disk size in bytes. For disks with 4096-byte
logical sectors qemu reports an eighth of it (it divides by the logical sector size where
it means 512-byte sectors); we follow the specification, so those disks convert whole.
"""

from __future__ import annotations

import functools
import struct
import uuid
from typing import Final

from importer.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from importer.formats.base import Limits, RawTarget
from importer.formats.claims import LayoutConverter, RunMap

KiB: Final = 1 << 10
MiB: Final = 1 << 20
TiB: Final = 1 << 40

HEADER_OFFSETS: Final = (64 * KiB, 128 * KiB)
HEADER_SIZE: Final = 4 * KiB
REGION_TABLE_OFFSET: Final = 192 * KiB
REGION_TABLE_SIZE: Final = 64 * KiB
METADATA_TABLE_SIZE: Final = 64 * KiB
HEADER_SECTION_END: Final = 1 * MiB
LOG_SECTOR: Final = 4 * KiB

MIN_BLOCK_SIZE: Final = 1 * MiB
MAX_BLOCK_SIZE: Final = 256 * MiB
MAX_VIRTUAL_SIZE: Final = 64 * TiB
MAX_REGION_ENTRIES: Final = 2047
MAX_METADATA_ENTRIES: Final = 2047
SECTORS_PER_CHUNK: Final = 1 << 23

BAT_GUID: Final = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID: Final = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS: Final = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE: Final = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA: Final = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE: Final = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE: Final = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR: Final = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

# The items we read, with their exact lengths; page 83 data must exist but is not needed.
ITEMS_READ: Final = {
    FILE_PARAMETERS: 8,
    VIRTUAL_DISK_SIZE: 8,
    LOGICAL_SECTOR_SIZE: 4,
    PHYSICAL_SECTOR_SIZE: 4,
}
ITEM_NAMES: Final = {
    FILE_PARAMETERS: "file parameters",
    VIRTUAL_DISK_SIZE: "virtual disk size",
    PAGE83_DATA: "page 83 data",
    LOGICAL_SECTOR_SIZE: "logical sector size",
    PHYSICAL_SECTOR_SIZE: "physical sector size",
    PARENT_LOCATOR: "parent locator",
}
METADATA_REQUIRED_FLAG: Final = 4
REGION_REQUIRED_FLAG: Final = 1
HAS_PARENT_FLAG: Final = 2

# Payload block states
NOT_PRESENT: Final = 0
UNDEFINED: Final = 1
ZERO: Final = 2
UNMAPPED: Final = 3
UNMAPPED_V095: Final = 5  # written by pre-1.0 implementations; qemu reads it as zeros
FULLY_PRESENT: Final = 6
PARTIALLY_PRESENT: Final = 7
ZERO_STATES: Final = frozenset((NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, UNMAPPED_V095))
OFFSET_MASK: Final = ~(MiB - 1) & 0xFFFFFFFFFFFFFFFF

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_REGION_HEADER = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")
_METADATA_HEADER = struct.Struct("<8sHH")
_METADATA_ENTRY = struct.Struct("<16sIII")
_LOG_ENTRY_SIGNATURE = b"loge"
_ZERO_GUID = bytes(16)


def _crc32c_table() -> list[int]:
    table = []
    for index in range(256):
        crc = index
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as VHDX checksums its headers, region and log entries."""
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def checksum_ok(data: bytes, offset: int = 4) -> bool:
    stored: int = struct.unpack_from("<I", data, offset)[0]
    return crc32c(data[:offset] + bytes(4) + data[offset + 4 :]) == stored


class Header:
    def __init__(self, data: bytes) -> None:
        self.raw = data
        (
            self.signature,
            _checksum,
            self.sequence,
            _file_write_guid,
            _data_write_guid,
            self.log_guid,
            self.log_version,
            self.version,
            self.log_length,
            self.log_offset,
        ) = _HEADER.unpack_from(data)
        self.valid = self.signature == b"head" and self.version == 1 and checksum_ok(data)


class Region:
    def __init__(self, name: str, offset: int, length: int) -> None:
        self.name = name
        self.offset = offset
        self.length = length

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlaps(self, start: int, end: int) -> bool:
        return start < self.end and self.offset < end


class VhdxConverter(LayoutConverter):
    format = "vhdx"

    def __init__(self, target: RawTarget, limits: Limits) -> None:
        super().__init__(target, limits)
        self.headers: list[Header] = []
        self.header: Header | None = None
        self.regions: list[Region] = []
        self.metadata: Region | None = None
        self.bat: Region | None = None
        self.items: dict[uuid.UUID, bytes] = {}
        self.items_expected = 0
        self.block_size = 0
        self.chunk_ratio = 0
        self.data_blocks = 0
        self.runs = RunMap("vhdx")
        layout = self.layout
        layout.capture(0, 8, "the file identifier", self._on_identifier)
        for number, offset in enumerate(HEADER_OFFSETS, 1):
            layout.capture(offset, HEADER_SIZE, f"header {number}", self._on_header)
        layout.capture(
            REGION_TABLE_OFFSET, REGION_TABLE_SIZE, "the region table", self._on_region_table
        )

    def check_end(self) -> None:
        self.layout.finish()
        if not self.layout.complete:
            raise InvalidImage("vhdx: the image ends before its metadata and BAT")

    # -- header section ----------------------------------------------------------------

    def _on_identifier(self, data: bytes) -> None:
        if data != b"vhdxfile":
            raise InvalidImage("vhdx: no `vhdxfile` file identifier at offset 0")

    def _on_header(self, data: bytes) -> None:
        self.headers.append(Header(data))
        if len(self.headers) == 2:
            self.header = self._current_header(*self.headers)
            self._check_log(self.header)

    @staticmethod
    def _current_header(first: Header, second: Header) -> Header:
        if not first.valid and not second.valid:
            raise InvalidImage(
                "vhdx: neither header is valid (bad signature, version or CRC-32C checksum)"
            )
        if first.valid != second.valid:
            return first if first.valid else second
        if first.sequence != second.sequence:
            return first if first.sequence > second.sequence else second
        if first.raw != second.raw:
            raise InvalidImage(
                f"vhdx: both headers have sequence number {first.sequence} but differ"
            )
        return first

    def _check_log(self, header: Header) -> None:
        if header.log_version != 0:
            raise UnsupportedFormat(f"vhdx: log version {header.log_version} is not supported")
        if header.log_offset < MiB or header.log_offset % MiB or header.log_length % MiB:
            raise InvalidImage(
                f"vhdx: the log ({header.log_offset:#x}, {header.log_length} bytes) is not "
                "placed at 1 MiB boundaries past the header section"
            )
        log = Region("the log", header.log_offset, header.log_length)
        self.regions.append(Region("the header section", 0, HEADER_SECTION_END))
        if log.length:
            self.regions.append(log)
        if header.log_guid == _ZERO_GUID or log.length == 0:
            return
        # The log is active: refuse if it holds an entry of this log, i.e. one that would
        # have to be replayed before the disk can be read.
        self.layout.stream(
            log.offset, log.length, "the log", LOG_SECTOR, self._on_log, self._on_log_end
        )

    def _on_log(self, rel: int, piece: memoryview | bytes) -> None:
        assert self.header is not None
        guid = self.header.log_guid
        for at in range(0, len(piece), LOG_SECTOR):
            if piece[at : at + 4] == _LOG_ENTRY_SIGNATURE and piece[at + 32 : at + 48] == guid:
                raise InvalidImage(
                    f"vhdx: the image needs log replay (a log entry at "
                    f"{self.header.log_offset + rel + at:#x}); open and close it in Hyper-V "
                    "or run `qemu-img check -r all` on it first"
                )

    def _on_log_end(self) -> None:
        return None

    def _on_region_table(self, data: bytes) -> None:
        signature, _checksum, count, _reserved = _REGION_HEADER.unpack_from(data)
        if signature != b"regi":
            raise InvalidImage("vhdx: region table 1 has no `regi` signature")
        if not checksum_ok(data):
            raise InvalidImage("vhdx: region table 1 CRC-32C checksum mismatch")
        if count > MAX_REGION_ENTRIES:
            raise InvalidImage(f"vhdx: the region table has {count} entries (at most 2047)")
        for index in range(count):
            raw_guid, offset, length, flags = _REGION_ENTRY.unpack_from(data, 16 + 32 * index)
            guid = uuid.UUID(bytes_le=raw_guid)
            if guid == BAT_GUID:
                name = "the BAT region"
            elif guid == METADATA_GUID:
                name = "the metadata region"
            elif flags & REGION_REQUIRED_FLAG:
                raise UnsupportedFormat(f"vhdx: required region {guid} is not known")
            else:
                name = f"region {guid}"
            region = Region(name, offset, length)
            if offset < MiB or offset % MiB or length % MiB or length == 0:
                raise InvalidImage(
                    f"vhdx: {name} ({offset:#x}, {length} bytes) is not placed at 1 MiB "
                    "boundaries past the header section"
                )
            for other in self.regions:
                if other.overlaps(region.offset, region.end):
                    raise InvalidImage(f"vhdx: {name} at {offset:#x} overlaps {other.name}")
            self.regions.append(region)
            if guid == BAT_GUID:
                if self.bat is not None:
                    raise InvalidImage("vhdx: the region table names two BAT regions")
                self.bat = region
            elif guid == METADATA_GUID:
                if self.metadata is not None:
                    raise InvalidImage("vhdx: the region table names two metadata regions")
                self.metadata = region
        if self.bat is None or self.metadata is None:
            raise InvalidImage("vhdx: the region table lacks the BAT or the metadata region")
        self.layout.capture(
            self.metadata.offset, METADATA_TABLE_SIZE, "the metadata table", self._on_metadata
        )

    # -- metadata ----------------------------------------------------------------------

    def _on_metadata(self, data: bytes) -> None:
        assert self.metadata is not None
        signature, _reserved, count = _METADATA_HEADER.unpack_from(data)
        if signature != b"metadata":
            raise InvalidImage("vhdx: the metadata table has no `metadata` signature")
        if count > MAX_METADATA_ENTRIES:
            raise InvalidImage(f"vhdx: the metadata table has {count} entries (at most 2047)")
        found: dict[uuid.UUID, tuple[int, int]] = {}
        for index in range(count):
            raw_guid, offset, length, flags = _METADATA_ENTRY.unpack_from(data, 32 + 32 * index)
            guid = uuid.UUID(bytes_le=raw_guid)
            if guid in found:
                raise InvalidImage(
                    f"vhdx: metadata item {ITEM_NAMES.get(guid, guid)} appears twice"
                )
            if guid not in ITEM_NAMES and flags & METADATA_REQUIRED_FLAG:
                raise UnsupportedFormat(f"vhdx: required metadata item {guid} is not known")
            found[guid] = (offset, length)
        for guid in (*ITEMS_READ, PAGE83_DATA):
            if guid not in found:
                raise InvalidImage(f"vhdx: the {ITEM_NAMES[guid]} metadata item is missing")
        self.items_expected = len(ITEMS_READ)
        for guid, size in ITEMS_READ.items():
            offset, length = found[guid]
            if length != size:
                raise InvalidImage(
                    f"vhdx: the {ITEM_NAMES[guid]} metadata item is {length} bytes, not {size}"
                )
            if offset < METADATA_TABLE_SIZE or offset + length > self.metadata.length:
                raise InvalidImage(
                    f"vhdx: the {ITEM_NAMES[guid]} metadata item at {offset:#x} lies outside "
                    "the metadata region"
                )
            self.layout.capture(
                self.metadata.offset + offset,
                length,
                f"the {ITEM_NAMES[guid]} item",
                functools.partial(self._on_item, guid),
            )

    def _on_item(self, guid: uuid.UUID, value: bytes) -> None:
        self.items[guid] = value
        if len(self.items) == self.items_expected:
            self._on_parameters()

    def _on_parameters(self) -> None:
        assert self.bat is not None
        block_size, flags = struct.unpack("<II", self.items[FILE_PARAMETERS])
        (virtual_size,) = struct.unpack("<Q", self.items[VIRTUAL_DISK_SIZE])
        (logical,) = struct.unpack("<I", self.items[LOGICAL_SECTOR_SIZE])
        (physical,) = struct.unpack("<I", self.items[PHYSICAL_SECTOR_SIZE])
        if flags & HAS_PARENT_FLAG:
            raise InvalidImage("vhdx: differencing disks (with a parent disk) are not accepted")
        if (
            block_size < MIN_BLOCK_SIZE
            or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)
        ):
            raise InvalidImage(
                f"vhdx: block size {block_size} is not a power of two from 1 MiB to 256 MiB"
            )
        if logical not in (512, 4096) or physical not in (512, 4096):
            raise InvalidImage(
                f"vhdx: sector sizes {logical}/{physical} (logical/physical) are not 512 or 4096"
            )
        if virtual_size == 0 or virtual_size % logical or virtual_size > MAX_VIRTUAL_SIZE:
            raise InvalidImage(
                f"vhdx: virtual disk size {virtual_size} is not a multiple of the {logical}-byte "
                "logical sector or exceeds 64 TiB"
            )
        if virtual_size > self.limits.max_virtual_size:
            raise ImageTooLarge(
                f"vhdx: virtual size {virtual_size} bytes exceeds the limit of "
                f"{self.limits.max_virtual_size} bytes"
            )
        self.target.declare_size(virtual_size)
        self.virtual_size = virtual_size
        self.block_size = block_size
        self.chunk_ratio = SECTORS_PER_CHUNK * logical // block_size
        self.data_blocks = -(-virtual_size // block_size)
        entries = self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio
        if entries * 8 > self.bat.length:
            raise InvalidImage(
                f"vhdx: the BAT region ({self.bat.length} bytes) is too small for {entries} entries"
            )
        self.layout.stream(
            self.bat.offset, entries * 8, "the BAT", 8, self._on_bat, self._on_bat_end
        )

    # -- BAT and data ------------------------------------------------------------------

    def _on_bat(self, rel: int, piece: memoryview | bytes) -> None:
        if not any(piece):
            return
        entries = struct.unpack(f"<{len(piece) // 8}Q", piece)
        group = self.chunk_ratio + 1
        block_size = self.block_size
        for index, entry in enumerate(entries, rel // 8):
            state = entry & 7
            if state in ZERO_STATES or index % group == self.chunk_ratio:
                continue  # zeros, or a sector bitmap entry (only differencing disks use them)
            block = index - index // group
            if state == PARTIALLY_PRESENT:
                raise InvalidImage(
                    f"vhdx: block {block} is partially present, which only differencing disks use"
                )
            if state != FULLY_PRESENT:
                raise InvalidImage(f"vhdx: BAT entry {index} has the invalid state {state}")
            offset = entry & OFFSET_MASK
            guest = block * block_size
            self.runs.add(offset, guest, min(block_size, self.virtual_size - guest))

    def _on_bat_end(self) -> None:
        for start, end in self.runs.regions():
            for region in self.regions:
                if region.overlaps(start, end):
                    raise InvalidImage(
                        f"vhdx: a payload block at {start:#x} overlaps {region.name}"
                    )
        self.layout.add_sorted(self.runs.place_claims("payload block", self.block_size))
        self.layout.complete = True
