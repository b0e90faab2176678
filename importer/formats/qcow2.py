"""qcow2 (versions 2 and 3) to raw, in one pass over the file.

A qcow2 file is a header cluster, then clusters holding tables and data in any order: the
L1 table (where the header says) points at L2 tables, which point at data clusters (or
compressed data at any byte offset). Reading in order, we learn where a structure lies only
once the table that points at it has arrived, so the converter keeps a set of *claims*:
byte ranges of the file it knows it needs, with what to do with them (parse as L1, parse
as L2, write to a guest offset, decompress to a guest offset). Claims are kept in heaps by
file offset; each arriving byte goes to the claims covering it.

qemu writes each L2 table before the data it maps, so data usually arrives claimed and is
written straight from the input. Bytes that arrive unclaimed while some tables are still
missing (compressed images, images with internal snapshots, resized images whose L1 moved
to the end) may still be claimed later: they go to a bounded `Spill`
(importer.formats.spill), in memory and then in a side file, and are served from there
when their table arrives. Once the L1 and every L2 table it points at have been read, the
map is complete: the spill is dropped and unclaimed bytes (refcounts, snapshots, stale
clusters) are skipped.

The claims are routed here rather than by the `StreamLayout` of importer.formats.claims,
which VMDK, VDI, VHD and VHDX use, because qcow2 claims may overlap and that engine
refuses overlaps by design: compressed clusters are packed at byte granularity and their
L2 entries round them to whole sectors, so neighbours share a sector; and a data cluster
may be mapped at two guest offsets (a refcount above one). So several claims are active at
once here, and spilled bytes are read without being forgotten (`Spill.read`), where the
layout engine serves each spilled byte once (`Spill.pop`). Pending claims are also kept
as arrays per table (24 bytes a run) rather than as objects.

Safety: backing files, external data files, encryption, unknown incompatible features and
the corrupt bit are refused; every size, offset and table is checked before anything is
allocated; structures that overlap the header or each other, and structures that lie past
the end of the file, are refused. The output equals `qemu-img convert -f qcow2 -O raw`.
"""

from __future__ import annotations

import heapq
import itertools
import struct
import sys
import zlib
from array import array
from typing import Final

from importer.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from importer.formats.base import Buffer, Converter, ImageInfo, Limits, MiB, RawTarget
from importer.formats.spill import Spill
from importer.formats.unwrap import max_unwrapped_size, zstd_decompress_exactly

MAGIC: Final = b"QFI\xfb"
MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21
SECTOR: Final = 512

# Limits qemu itself enforces when it opens an image.
MAX_L1_ENTRIES: Final = (32 * MiB) // 8
# Host offsets in qcow2 tables are at most 56 bits wide.
MAX_HOST_OFFSET: Final = 1 << 56
MAX_REFCOUNT_TABLE: Final = 8 * MiB
MAX_SNAPSHOTS: Final = 65536
MAX_REFCOUNT_ORDER: Final = 6
# Claims waiting for their data: this many runs of clusters (24 bytes each) is far
# beyond what any image written by qemu needs.
MAX_PENDING_RUNS: Final = 4 << 20
# Compressed clusters being collected at once: packed clusters share at most a sector with
# their neighbours, so only a crafted image needs more.
MAX_COLLECTING: Final = 64 * MiB

INCOMPAT_DIRTY: Final = 1 << 0
INCOMPAT_CORRUPT: Final = 1 << 1
INCOMPAT_DATA_FILE: Final = 1 << 2
INCOMPAT_COMPRESSION: Final = 1 << 3
INCOMPAT_EXTENDED_L2: Final = 1 << 4
KNOWN_INCOMPAT: Final = (
    INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2
)

COMPRESSION_ZLIB: Final = 0
COMPRESSION_ZSTD: Final = 1

EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_FEATURE_TABLE: Final = 0x6803F857
EXT_CRYPTO: Final = 0x0537BE77
EXT_DATA_FILE: Final = 0x44415441

L1_OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00
L2_OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00
FLAG_COMPRESSED: Final = 1 << 62
FLAG_ZERO: Final = 1
ALL_SUBCLUSTERS: Final = 0xFFFF_FFFF

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")
V2_HEADER_LENGTH: Final = 72
V3_HEADER_LENGTH: Final = 104
# Enough of the header to know the cluster size and version-3 fields.
HEADER_PREFIX: Final = 112

# What a claim is for.
_L1, _L2, _DATA, _COMPRESSED = range(4)
_METADATA: Final = (_L1, _L2)
_NEEDS_BYTES: Final = (_L1, _L2, _COMPRESSED)

_BIG_ENDIAN: Final = sys.byteorder == "big"
_INF: Final = 1 << 64


def _entries(data: Buffer) -> array[int]:
    """Big-endian 64-bit table entries, parsed in bulk."""
    table = array("Q")
    table.frombytes(data)
    if not _BIG_ENDIAN:
        table.byteswap()
    return table


class _Batch:
    """Claims of one kind made by one table, in increasing file offset."""

    __slots__ = ("ends", "guests", "index", "kind", "starts")

    def __init__(self, kind: int, starts: array[int], ends: array[int], guests: array[int]) -> None:
        self.kind = kind
        self.starts = starts
        self.ends = ends
        self.guests = guests
        self.index = 0

    def sort(self) -> None:
        starts = self.starts
        if all(starts[i] <= starts[i + 1] for i in range(len(starts) - 1)):
            return
        order = sorted(range(len(starts)), key=starts.__getitem__)
        self.starts = array("q", (starts[i] for i in order))
        self.ends = array("q", (self.ends[i] for i in order))
        self.guests = array("q", (self.guests[i] for i in order))


class _Claim:
    """A claim whose bytes are arriving: a range of the file and where its bytes go."""

    __slots__ = ("buf", "end", "guest", "kind", "start", "whole")

    def __init__(self, kind: int, start: int, end: int, guest: int) -> None:
        self.kind = kind
        self.start = start
        self.end = end
        self.guest = guest  # guest offset; for an L2 table, its L1 index
        self.buf: bytearray | None = None
        self.whole: Buffer | None = None  # all of it in one piece, valid during delivery


class Qcow2Converter(Converter):
    format = "qcow2"

    def __init__(self, target: RawTarget, limits: Limits) -> None:
        super().__init__(target, limits)
        self.pos = 0  # file offset of the next byte
        self._head: bytearray | None = bytearray()  # the header cluster, until parsed
        self._head_need = HEADER_PREFIX
        self.version = 0
        self.cluster_bits = 0
        self.cluster_size = 0
        self.size = 0
        self.extended_l2 = False
        self.compression = COMPRESSION_ZLIB
        self.l2_entries = 0
        self.l2_span = 0  # guest bytes one L2 table maps
        self._heap: list[tuple[int, int, _Batch]] = []
        self._seq = itertools.count()
        self._active: list[_Claim] = []
        self._pending_runs = 0
        self._pending_l2 = -1  # L2 tables still to read; -1 until the L1 is read
        self.map_complete = False
        self.spill = Spill(
            limits.spill_memory,
            limits.spill_dir,
            total_limit=max_unwrapped_size(limits),
            fmt=self.format,
            prefix="qcow2-spill-",
        )

    # -- the stream ----------------------------------------------------------------------

    def feed(self, data: memoryview) -> None:
        try:
            view = memoryview(data).cast("B")
            if self._head is not None:
                take = self._head_need - len(self._head)
                self._head += view[:take]
                view = view[take:]
                if len(self._head) == HEADER_PREFIX and self._head_need == HEADER_PREFIX:
                    self._head_need = self._check_prefix(bytes(self._head))
                    take = self._head_need - len(self._head)
                    self._head += view[:take]
                    view = view[take:]
                if len(self._head) < self._head_need:
                    return
                head = bytes(self._head)
                self._head = None
                self.pos = len(head)
                self._parse_header(head)
            self._route(view)
        except BaseException:
            self.close()
            raise

    def finish(self) -> ImageInfo:
        try:
            if self._head is not None:
                raise InvalidImage(
                    f"qcow2: the image is truncated: it ends at byte {len(self._head)}, "
                    "within its header cluster"
                )
            self._activate()
            for claim in self._active:
                if claim.kind != _COMPRESSED or claim.start >= self.pos:
                    raise self._past_end(claim.kind, claim.start, claim.end, claim.guest)
            # qemu reads compressed data past the end of the file as zeros: the last
            # compressed cluster's final sector may be cut short.
            for claim in self._active:
                self._deliver(claim, self.pos, memoryview(bytes(claim.end - self.pos)))
                self._complete(claim)
            self._active = []
            if self._heap:
                _, _, batch = self._heap[0]
                i = batch.index
                raise self._past_end(batch.kind, batch.starts[i], batch.ends[i], batch.guests[i])
            return ImageInfo(format=self.format, virtual_size=self.size)
        finally:
            self.close()

    def close(self) -> None:
        self.spill.clear()
        self._heap = []
        self._active = []

    # -- the header ------------------------------------------------------------------------

    def _check_prefix(self, head: bytes) -> int:
        """Version and cluster size, from the first bytes; returns the header cluster size."""
        magic, version = struct.unpack_from(">4sI", head)
        if magic != MAGIC:
            raise InvalidImage("qcow2: the magic is missing")
        if version == 1:
            raise UnsupportedFormat("qcow (version 1) images are not supported; use qcow2")
        if version not in (2, 3):
            raise UnsupportedFormat(f"qcow2 version {version} is not supported")
        cluster_bits: int = struct.unpack_from(">I", head, 20)[0]
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise InvalidImage(
                f"qcow2: cluster_bits {cluster_bits} is out of range "
                f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})"
            )
        return 1 << cluster_bits

    def _parse_header(self, head: bytes) -> None:
        (
            _magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
        ) = _HEADER_V2.unpack_from(head)
        cluster_size = 1 << cluster_bits
        if version == 2:
            incompatible, refcount_order, header_length, compression = 0, 4, V2_HEADER_LENGTH, 0
        else:
            incompatible, _compatible, _autoclear, refcount_order, header_length = (
                _HEADER_V3.unpack_from(head, V2_HEADER_LENGTH)
            )
            if header_length < V3_HEADER_LENGTH:
                raise InvalidImage(f"qcow2: header_length {header_length} is too short")
            if header_length > cluster_size:
                raise InvalidImage(
                    f"qcow2: header_length {header_length} exceeds the cluster size {cluster_size}"
                )
            compression = head[V3_HEADER_LENGTH] if header_length > V3_HEADER_LENGTH else 0

        extensions = self._read_extensions(head, header_length, backing_file_offset or cluster_size)

        if backing_file_offset:
            name = ""
            if backing_file_offset + backing_file_size <= cluster_size:
                raw_name = head[backing_file_offset : backing_file_offset + backing_file_size]
                name = f" ({raw_name.decode('utf-8', 'replace')!r})"
            raise InvalidImage(
                f"qcow2: the image has a backing file{name}; images that depend on another "
                "image are not accepted (flatten it with qemu-img convert first)"
            )
        if crypt_method or EXT_CRYPTO in extensions:
            kind = {1: "AES", 2: "LUKS"}.get(crypt_method, f"method {crypt_method}")
            raise InvalidImage(
                f"qcow2: the image is encrypted ({kind}); encrypted images are not accepted"
            )
        if incompatible & INCOMPAT_CORRUPT:
            raise InvalidImage(
                "qcow2: the image is marked corrupt; repair it with qemu-img check -r all"
            )
        if incompatible & INCOMPAT_DATA_FILE or EXT_DATA_FILE in extensions:
            name = extensions.get(EXT_DATA_FILE, b"").decode("utf-8", "replace")
            raise InvalidImage(
                f"qcow2: the image keeps its data in an external data file ({name!r}), "
                "which is not part of the upload"
            )
        unknown = incompatible & ~KNOWN_INCOMPAT
        if unknown:
            raise InvalidImage(
                f"qcow2: the image uses incompatible features we do not know: "
                f"{_feature_names(unknown, extensions.get(EXT_FEATURE_TABLE, b''))}"
            )
        if compression not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
            raise InvalidImage(f"qcow2: unknown compression type {compression}")
        if bool(compression) != bool(incompatible & INCOMPAT_COMPRESSION):
            raise InvalidImage(
                "qcow2: the compression type and its incompatible feature bit disagree"
            )
        if refcount_order > MAX_REFCOUNT_ORDER:
            raise InvalidImage(f"qcow2: refcount_order {refcount_order} is out of range (0..6)")
        if refcount_table_offset % cluster_size:
            raise InvalidImage(
                f"qcow2: the refcount table offset {refcount_table_offset:#x} is not "
                "cluster-aligned"
            )
        if refcount_table_clusters > MAX_REFCOUNT_TABLE >> cluster_bits:
            raise InvalidImage(
                f"qcow2: the refcount table of {refcount_table_clusters} clusters is too large"
            )
        if nb_snapshots > MAX_SNAPSHOTS:
            raise InvalidImage(f"qcow2: {nb_snapshots} snapshots are too many")
        if nb_snapshots and snapshots_offset % cluster_size:
            raise InvalidImage(
                f"qcow2: the snapshot table offset {snapshots_offset:#x} is not cluster-aligned"
            )

        # qemu counts whole sectors of the virtual size.
        size = size // SECTOR * SECTOR
        if size > self.limits.max_virtual_size:
            raise ImageTooLarge(
                f"qcow2: the virtual size {size} bytes exceeds the limit of "
                f"{self.limits.max_virtual_size} bytes"
            )
        self.target.declare_size(size)

        self.version = version
        self.cluster_bits = cluster_bits
        self.cluster_size = cluster_size
        self.size = size
        self.extended_l2 = bool(incompatible & INCOMPAT_EXTENDED_L2)
        self.compression = compression
        self.l2_entries = cluster_size // (16 if self.extended_l2 else 8)
        self.l2_span = self.l2_entries * cluster_size
        self._c_shift = 62 - (cluster_bits - 8)
        self._c_size_mask = (1 << (cluster_bits - 8)) - 1
        self._c_offset_mask = (1 << self._c_shift) - 1

        if l1_size > MAX_L1_ENTRIES:
            raise InvalidImage(f"qcow2: the L1 table of {l1_size} entries is too large")
        l1_needed = -(-size // self.l2_span)
        if l1_size < l1_needed:
            raise InvalidImage(
                f"qcow2: the L1 table has {l1_size} entries, but a disk of {size} bytes "
                f"needs {l1_needed}"
            )
        if l1_table_offset >= MAX_HOST_OFFSET:
            raise InvalidImage(
                f"qcow2: the L1 table offset {l1_table_offset:#x} lies past any possible file"
            )
        if l1_table_offset % cluster_size:
            raise InvalidImage(
                f"qcow2: the L1 table offset {l1_table_offset:#x} is not cluster-aligned"
            )
        if not l1_needed:
            self._pending_l2 = 0
            self.map_complete = True
            return
        if l1_table_offset < cluster_size:
            raise InvalidImage(
                f"qcow2: the L1 table at {l1_table_offset:#x} overlaps the header cluster"
            )
        self._push(
            _Batch(
                _L1,
                array("q", [l1_table_offset]),
                array("q", [l1_table_offset + 8 * l1_needed]),
                array("q", [0]),
            )
        )

    def _read_extensions(self, head: bytes, start: int, end: int) -> dict[int, bytes]:
        extensions: dict[int, bytes] = {}
        pos = start
        end = min(end, len(head))
        while pos + 8 <= end:
            kind, length = struct.unpack_from(">II", head, pos)
            pos += 8
            if kind == EXT_END:
                break
            if length > end - pos:
                raise InvalidImage(
                    f"qcow2: header extension {kind:#x} of {length} bytes overruns the header"
                )
            extensions[kind] = head[pos : pos + length]
            pos += (length + 7) & ~7
        return extensions

    # -- routing bytes to claims --------------------------------------------------------

    def _push(self, batch: _Batch) -> None:
        n = len(batch.starts)
        if not n:
            return
        self._pending_runs += n
        if self._pending_runs > MAX_PENDING_RUNS:
            raise InvalidImage(
                f"qcow2: more than {MAX_PENDING_RUNS} runs of clusters are mapped ahead of "
                "their data; the image is too fragmented to convert in one pass"
            )
        batch.sort()
        heapq.heappush(self._heap, (batch.starts[0], next(self._seq), batch))

    def _pop(self) -> _Claim:
        _, _, batch = heapq.heappop(self._heap)
        i = batch.index
        claim = _Claim(batch.kind, batch.starts[i], batch.ends[i], batch.guests[i])
        batch.index = i + 1
        self._pending_runs -= 1
        if i + 1 < len(batch.starts):
            heapq.heappush(self._heap, (batch.starts[i + 1], next(self._seq), batch))
        return claim

    def _route(self, view: memoryview) -> None:
        n = len(view)
        i = 0
        while True:
            self._activate()
            if i >= n:
                return
            pos = self.pos
            end = pos + (n - i)
            if self._heap and self._heap[0][0] < end:
                end = self._heap[0][0]
            active = self._active
            if not active:
                if not self.map_complete:
                    self.spill.add(pos, view[i : i + (end - pos)])
                i += end - pos
                self.pos = end
                continue
            for claim in active:
                if claim.end < end:
                    end = claim.end
            piece = view[i : i + (end - pos)]
            if not self.map_complete:
                self._keep_shared_sectors(pos, end, piece)
            for claim in active:
                self._deliver(claim, pos, piece)
            i += end - pos
            self.pos = end
            done = [claim for claim in active if claim.end == end]
            if done:
                self._active = [claim for claim in active if claim.end != end]
                for claim in done:
                    self._complete(claim)

    def _keep_shared_sectors(self, pos: int, end: int, piece: memoryview) -> None:
        """Compressed clusters are packed: one may start in the last sector of another, or
        end in the first sector of another, and its L2 table may come later. Those
        sectors are kept in the spill too, until the map is complete."""
        keep: list[tuple[int, int]] = []
        for claim in self._active:
            if claim.kind != _COMPRESSED:
                continue
            first_end = min(claim.end, (claim.start | (SECTOR - 1)) + 1)
            last_start = max(claim.start, (claim.end - 1) & ~(SECTOR - 1))
            for lo, hi in ((claim.start, first_end), (last_start, claim.end)):
                lo, hi = max(lo, pos), min(hi, end)
                if lo < hi:
                    keep.append((lo, hi))
        if not keep:
            return
        keep.sort()
        lo, hi = keep[0]
        for next_lo, next_hi in keep[1:]:
            if next_lo <= hi:
                hi = max(hi, next_hi)
                continue
            self.spill.add(lo, piece[lo - pos : hi - pos])
            lo, hi = next_lo, next_hi
        self.spill.add(lo, piece[lo - pos : hi - pos])

    def _activate(self) -> None:
        """Makes the claims that start at the current position active; serves claims on
        bytes already passed from the spill."""
        heap = self._heap
        while heap and heap[0][0] <= self.pos:
            claim = self._pop()
            if claim.start < self.pos:
                passed = min(claim.end, self.pos)
                if not self.spill.covers(claim.start, passed):
                    raise InvalidImage(
                        f"qcow2: {self._describe(claim.kind, claim.guest)} at "
                        f"{claim.start:#x} overlaps the header, a table or data that is "
                        "already mapped elsewhere"
                    )
                for offset, piece in self.spill.read(claim.start, passed):
                    self._deliver(claim, offset, memoryview(piece))
                if claim.end <= self.pos:
                    self._complete(claim)
                    continue
            clash = [a for a in self._active if a.kind in _METADATA or claim.kind in _METADATA]
            if clash:
                other = clash[0]
                raise InvalidImage(
                    f"qcow2: {self._describe(claim.kind, claim.guest)} at {claim.start:#x} "
                    f"overlaps {self._describe(other.kind, other.guest)} at {other.start:#x}"
                )
            self._active.append(claim)
            if claim.kind == _COMPRESSED:
                collecting = sum(a.end - a.start for a in self._active if a.kind == _COMPRESSED)
                if collecting > MAX_COLLECTING:
                    raise InvalidImage(
                        f"qcow2: compressed clusters around {claim.start:#x} overlap each "
                        "other far more than packing allows"
                    )
        if self.map_complete and self.spill and (not heap or heap[0][0] >= self.pos):
            self.spill.clear()

    def _deliver(self, claim: _Claim, offset: int, piece: memoryview) -> None:
        if claim.kind == _DATA:
            self.target.write(claim.guest + (offset - claim.start), piece)
        elif claim.buf is None and offset == claim.start and len(piece) == claim.end - claim.start:
            claim.whole = piece
        else:
            if claim.buf is None:
                claim.buf = bytearray()
            claim.buf += piece

    def _complete(self, claim: _Claim) -> None:
        kind = claim.kind
        if kind == _DATA:
            return
        data = claim.whole if claim.whole is not None else claim.buf
        claim.whole = claim.buf = None
        assert data is not None
        if kind == _L2:
            self._on_l2(claim.guest, claim.start, data)
        elif kind == _COMPRESSED:
            self._on_compressed(claim, data)
        else:
            self._on_l1(data)

    def _past_end(self, kind: int, start: int, end: int, guest: int) -> InvalidImage:
        what = self._describe(kind, guest)
        if start >= self.pos:
            return InvalidImage(
                f"qcow2: {what} at {start:#x} lies past the end of the image ({self.pos} bytes)"
            )
        return InvalidImage(
            f"qcow2: the image is truncated: it ends at byte {self.pos}, within {what} "
            f"at {start:#x}-{end:#x}"
        )

    def _describe(self, kind: int, guest: int) -> str:
        if kind == _L1:
            return "the L1 table"
        if kind == _L2:
            return f"the L2 table for guest offset {guest * self.l2_span:#x}"
        if kind == _COMPRESSED:
            return f"the compressed cluster for guest offset {guest:#x}"
        return f"the data for guest offset {guest:#x}"

    # -- the tables ----------------------------------------------------------------------

    def _on_l1(self, data: Buffer) -> None:
        cluster_mask = self.cluster_size - 1
        starts = array("q")
        indices = array("q")
        for index, entry in enumerate(_entries(data)):
            offset = entry & L1_OFFSET_MASK
            if not offset:
                continue
            if offset & cluster_mask:
                raise InvalidImage(
                    f"qcow2: L1 entry {index} points at an unaligned L2 table offset {offset:#x}"
                )
            starts.append(offset)
            indices.append(index)
        self._pending_l2 = len(starts)
        if not starts:
            self.map_complete = True
            return
        ends = array("q", (start + self.cluster_size for start in starts))
        self._push(_Batch(_L2, starts, ends, indices))

    def _on_l2(self, l1_index: int, table_offset: int, data: Buffer) -> None:
        guest_base = l1_index * self.l2_span
        count = min(self.l2_entries, -(-(self.size - guest_base) // self.cluster_size))
        width = 16 if self.extended_l2 else 8
        table = bytes(memoryview(data)[: count * width])
        if table.count(0) != len(table):
            entries = _entries(table)
            if self.extended_l2:
                self._map_extended(entries, guest_base, table_offset)
            else:
                self._map_standard(entries, guest_base, table_offset)
        self._pending_l2 -= 1
        if not self._pending_l2:
            self.map_complete = True

    def _map_standard(self, entries: array[int], guest_base: int, table_offset: int) -> None:
        cluster_size = self.cluster_size
        cluster_mask = cluster_size - 1
        size = self.size
        v2 = self.version == 2
        runs = _Runs()
        compressed = _Runs()
        guest = guest_base - cluster_size
        for entry in entries:
            guest += cluster_size
            if not entry:
                continue
            if entry & FLAG_COMPRESSED:
                self._add_compressed(compressed, entry, guest)
                continue
            if entry & FLAG_ZERO and v2:
                raise InvalidImage(
                    f"qcow2: the L2 table at {table_offset:#x} has a zero cluster entry "
                    f"(guest offset {guest:#x}) in a version 2 image"
                )
            host = entry & L2_OFFSET_MASK
            if host & cluster_mask:
                raise InvalidImage(
                    f"qcow2: the data for guest offset {guest:#x} is at an unaligned offset "
                    f"{host:#x}"
                )
            if host and not entry & FLAG_ZERO:
                runs.add(host, guest, min(cluster_size, size - guest))
        self._push(runs.batch(_DATA))
        self._push(compressed.batch(_COMPRESSED))

    def _map_extended(self, entries: array[int], guest_base: int, table_offset: int) -> None:
        cluster_size = self.cluster_size
        cluster_mask = cluster_size - 1
        sub = cluster_size // 32
        size = self.size
        runs = _Runs()
        compressed = _Runs()
        for j in range(0, len(entries), 2):
            entry = entries[j]
            bitmap = entries[j + 1]
            if not entry and not bitmap:
                continue
            guest = guest_base + (j // 2) * cluster_size
            if entry & FLAG_COMPRESSED:
                self._add_compressed(compressed, entry, guest)
                continue
            alloc = bitmap & ALL_SUBCLUSTERS
            if alloc & (bitmap >> 32):
                raise InvalidImage(
                    f"qcow2: the subcluster bitmap for guest offset {guest:#x} marks "
                    "subclusters both allocated and zero"
                )
            host = entry & L2_OFFSET_MASK
            if not host:
                if alloc:
                    raise InvalidImage(
                        f"qcow2: the cluster for guest offset {guest:#x} has allocated "
                        "subclusters but no host offset"
                    )
                continue
            if host & cluster_mask:
                raise InvalidImage(
                    f"qcow2: the data for guest offset {guest:#x} is at an unaligned offset "
                    f"{host:#x}"
                )
            if alloc == ALL_SUBCLUSTERS:
                runs.add(host, guest, min(cluster_size, size - guest))
                continue
            while alloc:
                first = (alloc & -alloc).bit_length() - 1
                rest = alloc >> first
                count = (rest ^ (rest + 1)).bit_length() - 1
                alloc &= ~(((1 << count) - 1) << first)
                start = guest + first * sub
                if start < size:
                    runs.add(host + first * sub, start, min(count * sub, size - start))
        self._push(runs.batch(_DATA))
        self._push(compressed.batch(_COMPRESSED))

    def _add_compressed(self, compressed: _Runs, entry: int, guest: int) -> None:
        offset = entry & self._c_offset_mask
        sectors = ((entry >> self._c_shift) & self._c_size_mask) + 1
        compressed.add_separate(offset, guest, sectors * SECTOR - (offset & (SECTOR - 1)))

    def _on_compressed(self, claim: _Claim, data: Buffer) -> None:
        cluster_size = self.cluster_size
        out: bytes | None
        if self.compression == COMPRESSION_ZSTD:
            out = zstd_decompress_exactly(data, cluster_size)
        else:
            try:
                out = zlib.decompressobj(-12).decompress(data, cluster_size)
            except zlib.error:
                out = None
        if out is None or len(out) < cluster_size:
            raise InvalidImage(
                f"qcow2: the compressed cluster for guest offset {claim.guest:#x} at "
                f"{claim.start:#x} does not decompress to a full cluster"
            )
        length = min(cluster_size, self.size - claim.guest)
        self.target.write(claim.guest, memoryview(out)[:length])


class _Runs:
    """Claims built entry by entry from one L2 table; clusters that follow each other both
    in the file and on the guest disk merge into one run."""

    __slots__ = ("ends", "guests", "starts")

    def __init__(self) -> None:
        self.starts = array("q")
        self.ends = array("q")
        self.guests = array("q")

    def add(self, host: int, guest: int, length: int) -> None:
        if self.starts:
            last_end = self.ends[-1]
            if last_end == host and self.guests[-1] + (last_end - self.starts[-1]) == guest:
                self.ends[-1] = last_end + length
                return
        self.add_separate(host, guest, length)

    def add_separate(self, host: int, guest: int, length: int) -> None:
        self.starts.append(host)
        self.ends.append(host + length)
        self.guests.append(guest)

    def batch(self, kind: int) -> _Batch:
        return _Batch(kind, self.starts, self.ends, self.guests)


def _feature_names(bits: int, table: bytes) -> str:
    """Names of incompatible feature bits, from the image's feature name table if it has
    one (48-byte entries: type, bit number, name)."""
    names = {}
    for pos in range(0, len(table) - 47, 48):
        kind, bit = table[pos], table[pos + 1]
        if kind == 0:
            names[bit] = table[pos + 2 : pos + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
    return ", ".join(
        f"bit {bit}" + (f" ({names[bit]})" if bit in names else "")
        for bit in range(64)
        if bits >> bit & 1
    )
