"""What a stream is, from its first bytes: a wrapper to take off, or a disk image format.

`sniff` looks at the head of a stream (the first bytes, as many as have arrived) and names
either a wrapper (`gzip`, `xz`, `zstd`, `bzip2`, `tar`) or a format (`qcow2`, `vmdk`, `vdi`,
`vhd`, `vhdx`, `iso`, `raw`). Formats we recognise but do not take raise
`UnsupportedFormat`; heads that can only be trouble (a VMDK text descriptor that names
other files) raise `InvalidImage`. A fixed VHD (footer only) and a DMG (trailer only) are
not visible at the start: a raw stream is checked for them at its end.
"""

from __future__ import annotations

import struct
from typing import Final

from importer.errors import InvalidImage, UnsupportedFormat
from importer.formats.base import Buffer
from importer.formats.tar import BLOCK as TAR_BLOCK
from importer.formats.tar import tar_checksum_ok

WRAPPERS: Final = ("gzip", "xz", "zstd", "bzip2", "tar")
FORMATS: Final = ("qcow2", "vmdk", "vdi", "vhd", "vhdx", "iso", "raw")

# ISO 9660 and UDF volume descriptors start at 32 KiB, one per 2 KiB sector; the head we
# look at covers the first 16 of them.
ISO_SECTOR: Final = 2048
ISO_DESCRIPTORS: Final = 32768
SNIFF_SIZE: Final = 64 * 1024

VDI_MAGIC_OFFSET: Final = 0x40
TAR_MAGIC_OFFSET: Final = 257

_BZIP2_BLOCK_MAGICS: Final = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
_UDF_NSR: Final = (b"NSR02", b"NSR03")


def sniff(head: Buffer, final: bool) -> str | None:
    """Name what the stream is, or None when more bytes are needed to tell. `final` says
    that `head` is the whole stream."""
    head = memoryview(head).cast("B")
    n = len(head)
    if n < 16 and not final:
        return None
    kind = _at_start(bytes(head[:16]))
    if kind is not None:
        return kind
    if n < VDI_MAGIC_OFFSET + 4 and not final:
        return None
    if bytes(head[VDI_MAGIC_OFFSET : VDI_MAGIC_OFFSET + 4]) == b"\x7f\x10\xda\xbe":
        return "vdi"
    if n < TAR_BLOCK and not final:
        return None
    if n >= TAR_BLOCK and is_tar_header(head[:TAR_BLOCK]):
        return "tar"
    if n < SNIFF_SIZE and not final:
        return None
    if _is_iso(head):
        return "iso"
    return "raw"


def _at_start(start: bytes) -> str | None:
    if start[:4] == b"QFI\xfb":
        version = struct.unpack_from(">I", start, 4)[0] if len(start) >= 8 else 0
        if version == 1:
            raise UnsupportedFormat("qcow (version 1) images are not supported; use qcow2")
        return "qcow2"
    if start[:4] == b"QED\x00":
        raise UnsupportedFormat("QED images are not supported; convert them to qcow2")
    if start[:6] == b"LUKS\xba\xbe":
        raise UnsupportedFormat("LUKS-encrypted images are not supported")
    if start[:4] == b"KDMV":
        return "vmdk"
    if start[:4] == b"COWD":
        raise UnsupportedFormat("VMDK ESX sparse (COWD) extents are not supported")
    if start.startswith(b"# Disk Descript"):
        raise InvalidImage(
            "vmdk: this is a text descriptor that refers to separate extent files; "
            "upload a single-file (monolithicSparse or streamOptimized) VMDK instead"
        )
    if start[:8] == b"conectix":
        return "vhd"
    if start[:8] == b"vhdxfile":
        return "vhdx"
    if start[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        raise UnsupportedFormat("Parallels images are not supported")
    if start[:3] == b"\x1f\x8b\x08":
        return "gzip"
    if start[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if start[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if start[:3] == b"BZh" and b"1" <= start[3:4] <= b"9" and start[4:10] in _BZIP2_BLOCK_MAGICS:
        return "bzip2"
    return None


def is_tar_header(block: Buffer) -> bool:
    """A ustar/GNU tar header block: the magic at 257 and a correct checksum."""
    block = bytes(block)
    if len(block) < TAR_BLOCK or block[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + 5] != b"ustar":
        return False
    return tar_checksum_ok(block)


def _is_iso(head: memoryview) -> bool:
    """ISO 9660 (`CD001` in the first volume descriptor) or UDF (an `NSR0x` descriptor in
    the volume recognition sequence)."""
    for start in range(ISO_DESCRIPTORS, len(head) - 5, ISO_SECTOR):
        k = (start - ISO_DESCRIPTORS) // ISO_SECTOR
        ident = bytes(head[start + 1 : start + 6])
        if k == 0 and ident == b"CD001":
            return True
        if ident in _UDF_NSR:
            return True
        if ident not in (b"CD001", b"BEA01", b"TEA01", b"BOOT2", b"CDW02"):
            return False
    return False
