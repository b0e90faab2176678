"""Feeding a converter as the pipeline does: consecutive pieces of random sizes, each
copied into a reused buffer that is scribbled over once the call returns."""

from __future__ import annotations

import random

from importer.formats.base import Buffer, Converter, ImageInfo

MiB = 1 << 20


def random_pieces(data: Buffer, rnd: random.Random, big: int = 4 * MiB) -> list[memoryview]:
    """Consecutive views of random sizes: single bytes, odd sizes and pieces of MiBs."""
    view = memoryview(data).cast("B")
    out = []
    pos = 0
    while pos < len(view):
        choice = rnd.random()
        if choice < 0.1:
            n = rnd.randint(1, 16)
        elif choice < 0.2:
            n = rnd.randint(1, 600)
        elif choice < 0.6:
            n = rnd.randint(1, 200_000)
        else:
            n = rnd.randint(1, big)
        out.append(view[pos : pos + n])
        pos += n
    return out


def feed_all(converter: Converter, data: Buffer, seed: int = 0) -> ImageInfo:
    rnd = random.Random(seed)
    scratch = bytearray(4 * MiB)
    for piece in random_pieces(data, rnd):
        n = len(piece)
        scratch[:n] = piece
        converter.feed(memoryview(scratch)[:n])
        scratch[:n] = b"\xa5" * n  # a converter that kept a view would see garbage
    return converter.finish()
