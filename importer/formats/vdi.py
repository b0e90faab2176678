"""VDI (VirtualBox), version 1.1: dynamic and fixed ("static") images.

The file is a 512-byte header (signature at 0x40), a block map of 32-bit entries, and data
blocks of 1 MiB: guest block i lies at `offset_data + map[i] * block_size` unless its entry
is 0xFFFFFFFF (never written) or 0xFFFFFFFE (discarded, reads as zeros). As in qemu, the
virtual size is the header's disk size rounded up to a whole sector, and only 1 MiB blocks
are taken (the only size VirtualBox writes).
"""

from __future__ import annotations

import struct
import uuid
from typing import Final

from importer.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from importer.formats.base import Limits, RawTarget
from importer.formats.claims import LayoutConverter, RunMap

HEADER_SIZE: Final = 512
SIGNATURE: Final = 0xBEDA107F
VERSION_1_1: Final = 0x00010001
SECTOR: Final = 512
BLOCK_SIZE: Final = 1 << 20

TYPE_DYNAMIC: Final = 1
TYPE_STATIC: Final = 2
TYPE_NAMES: Final = {3: "undo", 4: "differencing"}

# The first entry value that does not name a block: 0xFFFFFFFE discarded, 0xFFFFFFFF free.
FIRST_UNALLOCATED: Final = 0xFFFFFFFE

_HEADER = struct.Struct("<IIIII256sIIIIIIIQIIII16s16s16s16s")


class VdiConverter(LayoutConverter):
    format = "vdi"

    def __init__(self, target: RawTarget, limits: Limits) -> None:
        super().__init__(target, limits)
        self.blocks_in_image = 0
        self.offset_data = 0
        self.needed_blocks = 0
        self.runs = RunMap("vdi")
        self.layout.capture(0, HEADER_SIZE, "the header", self._on_header)

    def check_end(self) -> None:
        self.layout.finish()
        if not self.layout.complete:
            raise InvalidImage("vdi: the image ends before its block map")

    def _on_header(self, data: bytes) -> None:
        (
            signature,
            version,
            _header_size,
            image_type,
            _image_flags,
            _description,
            offset_bmap,
            offset_data,
            _cylinders,
            _heads,
            _sectors,
            sector_size,
            _unused,
            disk_size,
            block_size,
            block_extra,
            blocks_in_image,
            _blocks_allocated,
            _uuid_image,
            _uuid_last_snap,
            uuid_link,
            uuid_parent,
        ) = _HEADER.unpack_from(data, 0x40)
        if signature != SIGNATURE:
            raise InvalidImage(f"vdi: bad signature {signature:#010x} at offset 0x40")
        if version != VERSION_1_1:
            raise UnsupportedFormat(
                f"vdi: version {version >> 16}.{version & 0xFFFF} is not supported (only 1.1)"
            )
        if image_type in TYPE_NAMES:
            raise InvalidImage(
                f"vdi: {TYPE_NAMES[image_type]} images (image type {image_type}, they need a "
                "parent image) are not accepted"
            )
        if image_type not in (TYPE_DYNAMIC, TYPE_STATIC):
            raise InvalidImage(f"vdi: unknown image type {image_type}")
        if any(uuid_parent):
            raise InvalidImage(
                f"vdi: the image has a parent (UUID {uuid.UUID(bytes_le=uuid_parent)}): "
                "differencing images are not accepted"
            )
        if any(uuid_link):
            raise InvalidImage(
                f"vdi: the image is linked to another image (UUID {uuid.UUID(bytes_le=uuid_link)})"
            )
        if sector_size != SECTOR:
            raise InvalidImage(f"vdi: sector size {sector_size} is not {SECTOR}")
        if block_size != BLOCK_SIZE:
            raise UnsupportedFormat(f"vdi: block size {block_size} is not {BLOCK_SIZE} (1 MiB)")
        if block_extra != 0:
            raise UnsupportedFormat(
                f"vdi: blocks carry {block_extra} extra bytes each, which is not supported"
            )
        if offset_bmap % SECTOR or offset_data % SECTOR:
            raise InvalidImage(
                f"vdi: block map offset {offset_bmap:#x} or data offset {offset_data:#x} "
                "is not sector-aligned"
            )
        size = -(-disk_size // SECTOR) * SECTOR
        if size > self.limits.max_virtual_size:
            raise ImageTooLarge(
                f"vdi: virtual size {size} bytes exceeds the limit of "
                f"{self.limits.max_virtual_size} bytes"
            )
        if size > blocks_in_image * block_size:
            raise InvalidImage(
                f"vdi: disk size {disk_size} does not fit the {blocks_in_image} blocks "
                "of the block map"
            )
        needed = -(-size // block_size)
        self.target.declare_size(size)
        self.virtual_size = size
        self.blocks_in_image = blocks_in_image
        self.offset_data = offset_data
        self.needed_blocks = needed
        if blocks_in_image == 0:
            self.layout.complete = True
            return
        self.layout.stream(
            offset_bmap, blocks_in_image * 4, "the block map", 4, self._on_map, self._on_map_end
        )

    def _on_map(self, rel: int, piece: memoryview | bytes) -> None:
        if piece == b"\xff" * len(piece):
            return
        first = rel // 4
        entries = struct.unpack(f"<{len(piece) // 4}I", piece)
        for block, entry in enumerate(entries, first):
            if entry >= FIRST_UNALLOCATED or block >= self.needed_blocks:
                continue
            if entry >= self.blocks_in_image:
                raise InvalidImage(
                    f"vdi: block map entry {block} points at data block {entry}, past the "
                    f"{self.blocks_in_image} blocks of the image"
                )
            guest = block * BLOCK_SIZE
            self.runs.add(
                self.offset_data + entry * BLOCK_SIZE,
                guest,
                min(BLOCK_SIZE, self.virtual_size - guest),
            )

    def _on_map_end(self) -> None:
        self.layout.add_sorted(self.runs.place_claims("data block", BLOCK_SIZE))
        self.layout.complete = True
