"""Data that compresses like a disk image does, for the compressed-image scenarios.

Random data is pointless to compress (and xz crawls through it), so these scenarios send a
mix, chosen per 1 MiB block from a seeded stream: incompressible blocks (media, compressed
files), text-like blocks (bytes drawn with English letter frequencies, about 2x), blocks
of one 4 KiB record repeated (tables, padding) and zero blocks (free space). Overall xz and
zstd make about 2.5-3x of it. The same seed and size give the same bytes, and generating
runs at hundreds of MB/s (shake_128 as the random stream).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bench.units import MiB
from bench.workdir import SourceFile

BLOCK = MiB
SEED = b"dvcr-bench-compressible-1"

# Letters in rough English proportions, with spaces, line ends and a few digits and stops.
_FREQUENCIES = {
    " ": 180, "e": 100, "t": 70, "a": 65, "o": 60, "i": 57, "n": 57, "s": 53, "h": 50,
    "r": 50, "d": 35, "l": 33, "u": 23, "c": 22, "m": 20, "w": 18, "f": 18, "y": 16,
    "g": 16, "p": 15, "b": 12, "v": 8, "k": 6, "\n": 15, ",": 8, ".": 8, "0": 5, "1": 5,
    "2": 4, "x": 2, "j": 1, "q": 1, "z": 1,
}  # fmt: skip
_LETTERS = [c for c, n in _FREQUENCIES.items() for _ in range(n)]
TEXT_TABLE = bytes(ord(_LETTERS[i * len(_LETTERS) // 256]) for i in range(256))
_ZEROS = bytes(BLOCK)


def block(index: int, seed: bytes = SEED) -> bytes:
    """Block `index` of the stream: its first random byte picks the kind, a quarter each."""
    stream = hashlib.shake_128(seed + index.to_bytes(8, "little")).digest(BLOCK + 1)
    kind, data = stream[0], stream[1:]
    if kind < 64:
        return data
    if kind < 128:
        return data.translate(TEXT_TABLE)
    if kind < 192:
        return data[:4096].translate(TEXT_TABLE) * (BLOCK // 4096)
    return _ZEROS


def compressible_file(path: Path, size: int, seed: bytes = SEED) -> SourceFile:
    """`size` bytes of the stream, on disk and synced."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "wb") as f:
        index, left = 0, size
        while left:
            data = block(index, seed)[:left]
            f.write(data)
            sha256.update(data)
            md5.update(data)
            left -= len(data)
            index += 1
        f.flush()
        os.fsync(f.fileno())
    return SourceFile(path, size, sha256.hexdigest(), md5.hexdigest())
