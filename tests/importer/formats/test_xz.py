"""xz streams as the real `xz` writes them, decoded block by block on worker threads or one
piece at a time, always with the bytes `xz -d` gives."""

from __future__ import annotations

import functools
import os
import pickle
import random
import subprocess
from pathlib import Path

import pytest

from importer.errors import InvalidImage
from importer.formats.xz import XzDecoder

MiB = 1 << 20


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 MiB that compress a little and not at all, in turns."""
    rng = random.Random(7)
    words = [bytes(rng.choice(b"abcdefgh ") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    text = b" ".join(rng.choice(words) for _ in range(400_000))[:MiB]
    path = tmp_path_factory.mktemp("xz") / "disk.raw"
    path.write_bytes(b"".join([os.urandom(MiB), text, bytes(MiB)] * 2) + b"tail")
    return path


@functools.cache
def xz(raw: Path, *args: str) -> bytes:
    return subprocess.run(["xz", "-c", *args, str(raw)], capture_output=True, check=True).stdout


def xz_d(blob: bytes) -> bytes:
    return subprocess.run(["xz", "-dc"], input=blob, capture_output=True, check=True).stdout


def decode(blob: bytes, piece: int = 65536, **options: int) -> tuple[bytes, XzDecoder]:
    out = bytearray()
    decoder = XzDecoder(out.extend, **options)
    try:
        for start in range(0, len(blob), piece):
            decoder.feed(memoryview(blob)[start : start + piece])
        decoder.finish()
    finally:
        decoder.close()
    return bytes(out), decoder


@pytest.mark.parametrize("piece", [4097, 65536, MiB])
def test_multi_block_streams_are_decoded_on_workers(raw: Path, piece: int) -> None:
    blob = xz(raw, "-T2", "--block-size=1MiB")
    out, decoder = decode(blob, piece, workers=2)
    assert out == raw.read_bytes()
    assert decoder.parallel_blocks == 7  # six full blocks and the tail


class Collected:
    """Where decoded bytes go; pickled empty, so that a pickle's size is the decoder's."""

    def __init__(self) -> None:
        self.data = bytearray()

    def add(self, piece: bytes) -> None:
        self.data += piece

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.data = bytearray()


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.9])
def test_a_settled_decoder_is_saved_with_the_part_of_the_block_received(
    raw: Path, cut: float
) -> None:
    blob = xz(raw, "-T2", "--block-size=1MiB")
    at = int(len(blob) * cut)
    first = Collected()
    decoder = XzDecoder(first.add, workers=2)
    for start in range(0, at, 100_000):
        decoder.feed(memoryview(blob)[start : min(at, start + 100_000)])
    decoder.settle()
    handed_on = len(first.data)  # every block before the one being received
    assert handed_on % MiB == 0
    state = pickle.dumps(decoder, protocol=5)  # as snapshots are
    block = decoder._block
    held = block.received if block is not None else 0
    assert held < len(state) < held + 4096  # not the whole block, nor the blocks before
    decoder.feed(memoryview(blob)[at:])  # the first one may go on
    decoder.finish()
    decoder.close()
    assert first.data == raw.read_bytes()

    restored = pickle.loads(state)
    second = restored.emit.__self__
    restored.feed(memoryview(blob)[at:])
    restored.finish()
    restored.close()
    assert first.data[:handed_on] + second.data == raw.read_bytes()


def test_one_byte_at_a_time(raw: Path) -> None:
    blob = xz(raw, "-T2", "--block-size=1MiB", "-0")
    small = blob[:200_000]  # through the first blocks, then truncated
    with pytest.raises(InvalidImage, match="truncated"):
        decode(small, piece=1, workers=2)
    out, _ = decode(blob, piece=997, workers=2)
    assert out == xz_d(blob)


def test_a_single_threaded_stream_is_decoded_as_it_comes(raw: Path) -> None:
    blob = xz(raw, "-T1")
    out, decoder = decode(blob, workers=2)
    assert out == raw.read_bytes()
    assert decoder.parallel_blocks == 0


def test_a_block_too_large_to_hold_is_decoded_in_line_between_the_others(raw: Path) -> None:
    blob = xz(raw, "-T2", "--block-list=1MiB,4MiB,1MiB")
    out, decoder = decode(blob, workers=2, max_block=2 * MiB)
    assert out == raw.read_bytes()
    assert decoder.parallel_blocks == 3  # 1 MiB, 1 MiB and the tail; the 4 MiB one in line


def test_a_first_block_too_large_makes_the_whole_stream_sequential(raw: Path) -> None:
    blob = xz(raw, "-T2", "--block-size=4MiB")
    out, decoder = decode(blob, workers=2, max_block=2 * MiB)
    assert out == raw.read_bytes()
    assert decoder.parallel_blocks == 0


def test_concatenated_streams_and_padding(raw: Path) -> None:
    multi = xz(raw, "-T2", "--block-size=1MiB")
    single = xz(raw, "-T1")
    empty = subprocess.run(["xz", "-c"], input=b"", capture_output=True, check=True).stdout
    blob = multi + bytes(8) + single + empty + multi + bytes(4)
    out, decoder = decode(blob, workers=2)
    assert out == xz_d(blob) == raw.read_bytes() * 3
    assert decoder.streams == 4


def test_one_worker_decodes_in_line(raw: Path) -> None:
    blob = xz(raw, "-T2", "--block-size=1MiB")
    out, _ = decode(blob, workers=1)
    assert out == raw.read_bytes()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (lambda n: 7, "stream header is corrupt"),
        (lambda n: 14, "block header is corrupt"),
        (lambda n: 5000, "corrupt"),
        (lambda n: n - 30, "index"),
        (lambda n: n - 5, "footer"),
    ],
)
def test_damage_anywhere_is_refused(raw: Path, where: object, message: str) -> None:
    blob = bytearray(xz(raw, "-T2", "--block-size=1MiB"))
    blob[where(len(blob))] ^= 0x10  # type: ignore[operator]
    with pytest.raises(InvalidImage, match=message):
        decode(bytes(blob), workers=2)


def test_garbage_after_a_stream_is_refused(raw: Path) -> None:
    blob = xz(raw, "-T2", "--block-size=1MiB") + b"not xz at all"
    with pytest.raises(InvalidImage, match="magic"):
        decode(blob, workers=2)


@pytest.mark.parametrize("cut", [6, 100, 2 * MiB // 3, -20, -1])
def test_truncated_streams_are_refused(raw: Path, cut: int) -> None:
    blob = xz(raw, "-T2", "--block-size=1MiB")
    with pytest.raises(InvalidImage, match="truncated"):
        decode(blob[:cut], workers=2)
