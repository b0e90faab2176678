"""Test images: raw disks with random data, zero runs and holes."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

MiB = 1 << 20


def write_disk_image(path: Path, size: int, seed: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """A raw image with random data, explicit zero runs and holes; returns its sha256 and
    the zero ranges (offset, length), each a whole number of MiB."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    digest = hashlib.sha256()
    zero_ranges: list[tuple[int, int]] = []
    with open(path, "wb") as f:
        offset = 0
        i = 0
        while offset < size:
            length = min(size - offset, (1 + (rnd[i % 32] % 7)) * MiB)
            kind = i % 4
            if kind == 1:  # written zeros
                data = bytes(length)
                f.write(data)
                zero_ranges.append((offset, length))
            elif kind == 3:  # a hole
                f.seek(offset + length)
                f.truncate()
                data = bytes(length)
                zero_ranges.append((offset, length))
            else:
                data = os.urandom(length)
                f.write(data)
            digest.update(data)
            offset += length
            i += 1
        f.truncate(size)
    return digest.hexdigest(), zero_ranges


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def qemu_convert(base: Path, fmt: str, out: Path, *options: str) -> Path:
    """`qemu-img convert` of a raw image to FMT (always with -f, never probing)."""
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(base), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def make_iso(directory: Path) -> Path:
    """A small ISO 9660 image made by xorriso."""
    content = directory / "iso-content"
    content.mkdir()
    (content / "README").write_text("installer\n")
    iso = directory / "installer.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), str(content)],
        check=True,
        capture_output=True,
    )
    return iso
