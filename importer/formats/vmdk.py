"""VMDK hosted sparse extents: monolithicSparse and streamOptimized, one file each.

The file starts with a `KDMV` header, then an embedded text descriptor. In a monolithicSparse
image a grain directory (GD) names grain tables (GTs), whose entries give the sector of each
grain (the allocation unit, 64 KiB by default) of the disk; grains are raw. A
streamOptimized image holds deflate-compressed grains, each behind a marker giving its guest
sector, so grains can be placed as they arrive. Its tables come either before the grains
(qemu writes them there) or after them behind GT and GD markers, with the real GD offset in a
footer (a header copy) and an end-of-stream marker (VMware writes them so).

qemu reads a streamOptimized image through its tables, not its markers. We place grains by
their markers and check at the end that the tables say the same: every allocated table entry
must name a grain marker for that guest grain, and every grain marker must be named by its
entry. This is done with order-independent sums, so it needs memory per table, not per grain.

Refused: descriptor files and embedded descriptors that reference other files (split,
flat, VMFS extents), parent links (differencing disks), unknown flags, grain sizes that are
not a power of two or absurd, table entries past the capacity, truncated streams.
"""

from __future__ import annotations

import bisect
import functools
import re
import struct
import zlib
from array import array
from typing import Final

from importer.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from importer.formats.base import Limits, RawTarget
from importer.formats.claims import Claim, ClaimSource, LayoutConverter, RunMap, capture_claim

SECTOR: Final = 512
MAGIC: Final = b"KDMV"
GD_AT_END: Final = 0xFFFFFFFFFFFFFFFF

FLAG_NEWLINE_TEST: Final = 1 << 0
FLAG_REDUNDANT_GT: Final = 1 << 1
FLAG_ZERO_GRAIN: Final = 1 << 2
FLAG_COMPRESSED: Final = 1 << 16
FLAG_MARKERS: Final = 1 << 17
KNOWN_FLAGS: Final = (
    FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GT | FLAG_ZERO_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS
)
COMPRESSION_DEFLATE: Final = 1

MAX_GRAIN_SECTORS: Final = 1 << 15  # 16 MiB grains; VMware and qemu write 64 KiB
MAX_GTES_PER_GT: Final = 512
MAX_DESCRIPTOR_SECTORS: Final = 2048  # 1 MiB
MAX_GD_ENTRIES: Final = 1 << 20  # 32 TiB with 64 KiB grains
GTE_ZEROED: Final = 1

MARKER_EOS: Final = 0
MARKER_GT: Final = 1
MARKER_GD: Final = 2
MARKER_FOOTER: Final = 3

ACCEPTED_TYPES: Final = {"monolithicsparse", "streamoptimized"}
REFERENCING_TYPES: Final = {
    "twogbmaxextentsparse",
    "twogbmaxextentflat",
    "monolithicflat",
    "vmfs",
    "vmfssparse",
    "vmfsraw",
    "vmfsrdm",
    "vmfsrawdevicemap",
    "vmfspassthroughrawdevicemap",
    "fullDevice".lower(),
    "partitionedDevice".lower(),
    "sesparse",
    "custom",
}

_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_EXTENT_LINE = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)")?', re.I)
_KEY_VALUE = re.compile(r'^\s*([A-Za-z][\w.]*)\s*=\s*"?([^"\r\n]*)"?\s*$')
_MASK64: Final = (1 << 64) - 1


def _mix(value: int) -> int:
    """A 64-bit mixing function (splitmix64's finaliser) for the table/marker check."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class SparseHeader:
    """The 512-byte sparse extent header (also the footer of a streamOptimized image)."""

    def __init__(self, data: bytes) -> None:
        (
            self.magic,
            self.version,
            self.flags,
            self.capacity,
            self.grain_sectors,
            self.descriptor_offset,
            self.descriptor_sectors,
            self.gtes_per_gt,
            self.rgd_offset,
            self.gd_offset,
            self.overhead,
            _unclean,
            _newlines,
            self.compression,
        ) = _HEADER.unpack_from(data)

    def key(self) -> tuple[int, ...]:
        """The fields a footer must repeat."""
        return (
            self.version,
            self.flags,
            self.capacity,
            self.grain_sectors,
            self.gtes_per_gt,
            self.compression,
        )


def refuse_non_sparse(data: bytes) -> None:
    """Explains why a stream that does not start with `KDMV` is not taken."""
    if data[:4] == b"COWD":
        raise UnsupportedFormat("vmdk: ESX/VMware 3 sparse extents (COWD) are not supported")
    text = data.decode("latin-1")
    if "DescriptorFile" in text or "createType" in text:
        create_type = re.search(r'createType\s*=\s*"?(\w+)', text)
        kind = f" (createType {create_type.group(1)})" if create_type else ""
        raise InvalidImage(
            f"vmdk: this is a descriptor file{kind}, which references other files holding "
            "the disk data; upload a single-file monolithicSparse or streamOptimized VMDK "
            "instead (e.g. `qemu-img convert -O vmdk -o subformat=streamOptimized`)"
        )
    raise InvalidImage("vmdk: no `KDMV` sparse extent header at offset 0")


def check_descriptor(text: str) -> None:
    """Refuses descriptors that make the image depend on other files."""
    create_type = None
    extents: list[tuple[str, str, str]] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        extent = _EXTENT_LINE.match(line)
        if extent:
            extents.append((extent.group(3), extent.group(4) or "", extent.group(2)))
            continue
        pair = _KEY_VALUE.match(line)
        if not pair:
            continue
        key, value = pair.group(1), pair.group(2).strip()
        lowered = key.lower()
        if lowered == "createtype":
            create_type = value
        elif lowered == "parentcid" and value.lower() != "ffffffff":
            raise InvalidImage(
                f"vmdk: the descriptor names a parent (parentCID={value}): differencing "
                "disks are not accepted"
            )
        elif lowered == "parentfilenamehint":
            raise InvalidImage(
                f'vmdk: the descriptor names a parent disk ("{value}"): differencing disks '
                "are not accepted"
            )
    if create_type is None and not extents:
        raise InvalidImage(
            "vmdk: the embedded descriptor is empty: this is one extent of a disk split over "
            "several files, not a whole disk"
        )
    if create_type is not None:
        lowered = create_type.lower()
        if lowered in REFERENCING_TYPES:
            raise InvalidImage(
                f"vmdk: createType {create_type} references other files; only single-file "
                "monolithicSparse and streamOptimized images are accepted"
            )
        if lowered not in ACCEPTED_TYPES:
            raise InvalidImage(f"vmdk: unknown createType {create_type!r}")
    if len(extents) > 1 or any(kind.upper() != "SPARSE" for kind, _, _ in extents):
        names = ", ".join(f'{kind} "{name}"' for kind, name, _ in extents)
        raise InvalidImage(
            f"vmdk: the descriptor references other files ({len(extents)} extents: {names}); "
            "only a single sparse extent in this file is accepted"
        )


class VmdkConverter(LayoutConverter):
    format = "vmdk"

    def __init__(self, target: RawTarget, limits: Limits) -> None:
        super().__init__(target, limits)
        self.header: SparseHeader | None = None
        self.grain_bytes = 0
        self.total_grains = 0
        self.markers = False
        self.gts_pending = 0
        self.runs = RunMap("vmdk")
        # streamOptimized: the marker chain and the table/marker check
        self.next_marker: Claim | None = None
        self.eos_end = -1
        self.footer_marker = -1
        self.gd_sector = -1
        self.marker_sum = 0
        self.marker_count = 0
        self.table_sum = 0
        self.table_count = 0
        self.tables_done = False
        # Grain tables streamed behind markers, in stream order: their sector, and the sums
        # and entry counts the check needs (see `_on_loose_gt`).
        self.loose_sectors = array("Q")
        self.loose_sums = array("Q")  # plain, weighted, plain, weighted, ...
        self.loose_counts = array("q")  # count, last index, count, last index, ...
        self.head = bytearray()  # the first sector, to explain a stream that is no VMDK
        self.layout.capture(0, SECTOR, "the header", self._on_header)

    def feed(self, data: memoryview) -> None:
        if len(self.head) < SECTOR:
            self.head += data[: SECTOR - len(self.head)]
        super().feed(data)

    def check_end(self) -> None:
        if self.header is None and self.head[:4] != MAGIC:
            refuse_non_sparse(bytes(self.head))  # e.g. a descriptor file, shorter than a sector
        if not self.markers:
            self.layout.finish()
            if not self.layout.complete:
                raise InvalidImage("vmdk: the image ends before its grain tables")
            return
        marker = self.next_marker
        if marker is not None and marker.start >= self.layout.pos:
            self.layout.finish(optional=marker)
        else:
            self.layout.finish()
        header = self.header
        assert header is not None
        if header.gd_offset == GD_AT_END:
            # qemu finds the footer 1536 bytes before the end of the file
            end = self.layout.pos
            if self.footer_marker < 0 or self.eos_end < 0:
                raise InvalidImage(
                    "vmdk: the stream is truncated: it ends without the footer and "
                    "end-of-stream marker that carry its grain directory"
                )
            if self.eos_end != end or self.footer_marker != end - 3 * SECTOR:
                raise InvalidImage(
                    "vmdk: the stream does not end with its footer and end-of-stream marker"
                )
        if not self.tables_done:
            raise InvalidImage("vmdk: the stream ends before its grain directory")
        if (self.marker_sum, self.marker_count) != (self.table_sum, self.table_count):
            raise InvalidImage(
                f"vmdk: the grain tables ({self.table_count} grains) do not match the "
                f"{self.marker_count} grain markers of the stream: a grain is missing, "
                "misplaced or unreferenced"
            )

    # -- header and descriptor ---------------------------------------------------------

    def _on_header(self, data: bytes) -> None:
        if data[:4] != MAGIC:
            refuse_non_sparse(data)
        header = SparseHeader(data)
        self._check_header(header)
        self.header = header
        self.virtual_size = header.capacity * SECTOR
        self.grain_bytes = header.grain_sectors * SECTOR
        self.total_grains = -(-header.capacity // header.grain_sectors)
        self.markers = bool(header.flags & FLAG_MARKERS)
        self.target.declare_size(self.virtual_size)
        self.layout.capture(
            header.descriptor_offset * SECTOR,
            header.descriptor_sectors * SECTOR,
            "the embedded descriptor",
            self._on_descriptor,
        )
        if header.gd_offset != GD_AT_END:
            gd_entries = -(-self.total_grains // header.gtes_per_gt)
            if gd_entries > MAX_GD_ENTRIES:
                raise InvalidImage(f"vmdk: the grain directory has {gd_entries} entries")
            self.layout.capture(
                header.gd_offset * SECTOR, gd_entries * 4, "the grain directory", self._on_gd
            )
        elif not self.markers:
            raise InvalidImage("vmdk: the grain directory is at the end but grains have no markers")
        else:
            self.layout.complete = True
        if self.markers:
            self._expect_marker(header.overhead * SECTOR)

    def _check_header(self, header: SparseHeader) -> None:
        if not 1 <= header.version <= 3:
            raise UnsupportedFormat(
                f"vmdk: sparse extent version {header.version} is not supported"
            )
        unknown = header.flags & ~KNOWN_FLAGS
        if unknown:
            raise InvalidImage(f"vmdk: unknown header flags {unknown:#x}")
        if header.compression not in (0, COMPRESSION_DEFLATE):
            raise UnsupportedFormat(f"vmdk: unknown compression algorithm {header.compression}")
        # Like qemu, the algorithm field alone says whether grains are compressed.
        compressed = header.compression == COMPRESSION_DEFLATE
        if compressed != bool(header.flags & FLAG_MARKERS):
            raise UnsupportedFormat(
                "vmdk: compressed grains without markers (or markers without compression) "
                "are not supported"
            )
        if header.capacity == 0:
            raise InvalidImage(
                "vmdk: capacity 0: the embedded descriptor would describe other files"
            )
        grain = header.grain_sectors
        if grain < 1 or grain > MAX_GRAIN_SECTORS or grain & (grain - 1):
            raise InvalidImage(
                f"vmdk: grain size of {grain} sectors is not a power of two up to "
                f"{MAX_GRAIN_SECTORS}"
            )
        if not 1 <= header.gtes_per_gt <= MAX_GTES_PER_GT:
            raise InvalidImage(f"vmdk: {header.gtes_per_gt} entries per grain table (1 to 512)")
        size = header.capacity * SECTOR
        if size > self.limits.max_virtual_size:
            raise ImageTooLarge(
                f"vmdk: virtual size {size} bytes exceeds the limit of "
                f"{self.limits.max_virtual_size} bytes"
            )
        if header.descriptor_offset == 0 or header.descriptor_sectors == 0:
            raise InvalidImage(
                "vmdk: no embedded descriptor: this is one extent of a disk split over "
                "several files, not a whole disk"
            )
        if (
            header.descriptor_sectors > MAX_DESCRIPTOR_SECTORS
            or header.descriptor_offset >= 1 << 40
        ):
            raise InvalidImage(
                f"vmdk: the embedded descriptor ({header.descriptor_sectors} sectors at sector "
                f"{header.descriptor_offset}) is absurd"
            )
        if header.gd_offset != GD_AT_END and header.gd_offset >= 1 << 40:
            raise InvalidImage(f"vmdk: grain directory sector {header.gd_offset} is absurd")
        if header.overhead >= 1 << 40:
            raise InvalidImage(f"vmdk: overhead of {header.overhead} sectors is absurd")

    def _on_descriptor(self, data: bytes) -> None:
        check_descriptor(data.split(b"\0", 1)[0].decode("utf-8", "replace"))

    # -- grain directory and tables ----------------------------------------------------

    def _on_gd(self, data: bytes) -> None:
        # (sector << 20 | index) of each table, sorted: where the tables come in the stream
        tables = array("Q", (sector << 20 | index for index, sector in enumerate(
            struct.unpack(f"<{len(data) // 4}I", data)) if sector))  # fmt: skip
        if any(tables[i] > tables[i + 1] for i in range(len(tables) - 1)):
            tables = array("Q", sorted(tables))
        self.gts_pending = len(tables)
        if not tables:
            self._on_tables_done()
            return
        self.layout.add_sorted(ClaimSource(iter(tables), self._gt_claim))

    def _gt_claim(self, key: int) -> Claim:
        assert self.header is not None
        sector, index = key >> 20, key & 0xFFFFF
        return capture_claim(
            sector * SECTOR,
            self.header.gtes_per_gt * 4,
            f"grain table {index}",
            functools.partial(self._on_gt, index),
        )

    def _on_gt(self, index: int, data: bytes) -> None:
        assert self.header is not None
        per_gt = self.header.gtes_per_gt
        zero_grain = bool(self.header.flags & FLAG_ZERO_GRAIN)
        first = index * per_gt
        entries = struct.unpack(f"<{per_gt}I", data)
        for i, sector in enumerate(entries):
            if sector == 0 or (sector == GTE_ZEROED and zero_grain):
                continue
            grain = first + i
            if grain >= self.total_grains:
                raise InvalidImage(
                    f"vmdk: grain table {index} maps grain {grain} (guest offset "
                    f"{grain * self.grain_bytes:#x}), past the capacity of "
                    f"{self.virtual_size} bytes"
                )
            if self.markers:
                self.table_sum = (self.table_sum + _mix(sector) * (grain + 1)) & _MASK64
                self.table_count += 1
            else:
                guest = grain * self.grain_bytes
                length = min(self.grain_bytes, self.virtual_size - guest)
                self.runs.add(sector * SECTOR, guest, length)
        self.gts_pending -= 1
        if self.gts_pending == 0:
            self._on_tables_done()

    def _on_tables_done(self) -> None:
        self.tables_done = True
        if not self.markers:
            self.layout.add_sorted(self.runs.place_claims("grain", self.grain_bytes))
        self.layout.complete = True

    # -- streamOptimized marker chain ----------------------------------------------------

    def _expect_marker(self, offset: int) -> None:
        claim = capture_claim(
            offset, 12, f"the marker at {offset:#x}", functools.partial(self._on_marker, offset)
        )
        self.next_marker = claim
        self.layout.add(claim)

    def _on_marker(self, offset: int, data: bytes) -> None:
        value, size = struct.unpack("<QI", data)
        if size == 0:
            self.layout.capture(
                offset + 12,
                4,
                f"the marker type at {offset:#x}",
                functools.partial(self._on_metadata_marker, offset, value),
            )
            return
        lba = value
        if lba * SECTOR % self.grain_bytes:
            raise InvalidImage(
                f"vmdk: the grain marker at {offset:#x} names sector {lba}, which does not "
                "start a grain"
            )
        if lba * SECTOR >= self.virtual_size:
            raise InvalidImage(
                f"vmdk: the grain marker at {offset:#x} names guest offset {lba * SECTOR:#x}, "
                f"past the capacity of {self.virtual_size} bytes"
            )
        if size > 2 * self.grain_bytes + 1024:
            raise InvalidImage(
                f"vmdk: the grain at {offset:#x} claims {size} compressed bytes for a "
                f"{self.grain_bytes}-byte grain"
            )
        self.layout.capture(
            offset + 12,
            size,
            f"the grain at {offset:#x}",
            functools.partial(self._on_grain, offset, lba),
        )

    def _on_grain(self, offset: int, lba: int, payload: bytes) -> None:
        inflater = zlib.decompressobj()
        try:
            grain = inflater.decompress(payload, self.grain_bytes)
        except zlib.error as exc:
            raise InvalidImage(f"vmdk: the grain at {offset:#x} does not inflate: {exc}") from exc
        if inflater.unconsumed_tail:
            raise InvalidImage(
                f"vmdk: the grain at {offset:#x} inflates to more than {self.grain_bytes} bytes"
            )
        if not inflater.eof:
            raise InvalidImage(f"vmdk: the compressed grain at {offset:#x} is cut short")
        guest = lba * SECTOR
        visible = min(self.grain_bytes, self.virtual_size - guest)
        if len(grain) < visible:
            raise InvalidImage(
                f"vmdk: the grain at {offset:#x} inflates to {len(grain)} bytes, not {visible}"
            )
        self.target.write(guest, memoryview(grain)[:visible])
        grain_index = guest // self.grain_bytes
        self.marker_sum = (self.marker_sum + _mix(offset // SECTOR) * (grain_index + 1)) & _MASK64
        self.marker_count += 1
        self._expect_marker(_round_up(offset + 12 + len(payload)))

    def _on_metadata_marker(self, offset: int, sectors: int, kind_bytes: bytes) -> None:
        (kind,) = struct.unpack("<I", kind_bytes)
        assert self.header is not None
        data_start = offset + SECTOR
        at_end = self.header.gd_offset == GD_AT_END
        if kind == MARKER_EOS:
            if sectors:
                raise InvalidImage(f"vmdk: the end-of-stream marker at {offset:#x} is not empty")
            # In a stream with its tables at the start (qemu's) zero padding may follow, and
            # qemu ignores anything there; the table check covers every grain it would read.
            self.eos_end = offset + SECTOR
            self.next_marker = None
            return
        if kind == MARKER_GT:
            size = self.header.gtes_per_gt * 4
            if sectors * SECTOR < size or sectors > 2048:
                raise InvalidImage(
                    f"vmdk: the grain table marker at {offset:#x} gives {sectors} sectors"
                )
            if at_end:
                self.layout.capture(
                    data_start,
                    size,
                    f"the grain table at {data_start:#x}",
                    functools.partial(self._on_loose_gt, data_start // SECTOR),
                )
        elif kind == MARKER_GD:
            if at_end:
                entries = -(-self.total_grains // self.header.gtes_per_gt)
                if sectors * SECTOR < entries * 4 or entries > MAX_GD_ENTRIES:
                    raise InvalidImage(
                        f"vmdk: the grain directory at {offset:#x} ({sectors} sectors) cannot "
                        f"hold {entries} entries"
                    )
                self.gd_sector = data_start // SECTOR
                self.layout.capture(
                    data_start, entries * 4, "the grain directory", self._on_loose_gd
                )
        elif kind == MARKER_FOOTER:
            if sectors != 1:
                raise InvalidImage(
                    f"vmdk: the footer marker at {offset:#x} gives {sectors} sectors"
                )
            self.footer_marker = offset
            self.layout.capture(data_start, SECTOR, "the footer", self._on_footer)
        else:
            raise InvalidImage(f"vmdk: unknown marker type {kind} at {offset:#x}")
        self._expect_marker(data_start + sectors * SECTOR)

    def _on_loose_gt(self, sector: int, data: bytes) -> None:
        """A grain table behind a marker; its index is known once the GD arrives."""
        assert self.header is not None
        zero_grain = bool(self.header.flags & FLAG_ZERO_GRAIN)
        weighted = plain = count = 0
        last = -1
        for i, entry in enumerate(struct.unpack(f"<{self.header.gtes_per_gt}I", data)):
            if entry == 0 or (entry == GTE_ZEROED and zero_grain):
                continue
            mixed = _mix(entry)
            plain += mixed
            weighted += mixed * (i + 1)
            count += 1
            last = i
        if len(self.loose_sectors) >= -(-self.total_grains // self.header.gtes_per_gt):
            raise InvalidImage("vmdk: the stream holds more grain tables than the disk has")
        self.loose_sectors.append(sector)
        self.loose_sums.extend((plain & _MASK64, weighted & _MASK64))
        self.loose_counts.extend((count, last))

    def _on_loose_gd(self, data: bytes) -> None:
        assert self.header is not None
        per_gt = self.header.gtes_per_gt
        for index, sector in enumerate(struct.unpack(f"<{len(data) // 4}I", data)):
            if sector == 0:
                continue
            at = bisect.bisect_left(self.loose_sectors, sector)
            if at == len(self.loose_sectors) or self.loose_sectors[at] != sector:
                raise InvalidImage(
                    f"vmdk: grain directory entry {index} points at sector {sector}, where "
                    "no grain table was streamed"
                )
            plain, weighted = self.loose_sums[2 * at : 2 * at + 2]
            count, last = self.loose_counts[2 * at : 2 * at + 2]
            if count < 0:
                raise InvalidImage(
                    f"vmdk: the grain directory names the grain table at sector {sector} twice"
                )
            self.loose_counts[2 * at] = -1
            if count and index * per_gt + last >= self.total_grains:
                raise InvalidImage(
                    f"vmdk: grain table {index} maps grain {index * per_gt + last}, past the "
                    f"capacity of {self.virtual_size} bytes"
                )
            self.table_sum = (self.table_sum + index * per_gt * plain + weighted) & _MASK64
            self.table_count += count
        self.tables_done = True

    def _on_footer(self, data: bytes) -> None:
        assert self.header is not None
        footer = SparseHeader(data)
        if footer.magic != MAGIC or footer.key() != self.header.key():
            raise InvalidImage("vmdk: the footer does not repeat the header")
        if self.header.gd_offset == GD_AT_END and footer.gd_offset != self.gd_sector:
            raise InvalidImage(
                f"vmdk: the footer puts the grain directory at sector {footer.gd_offset}, "
                f"but it was streamed at sector {self.gd_sector}"
            )


def _round_up(offset: int) -> int:
    return -(-offset // SECTOR) * SECTOR
