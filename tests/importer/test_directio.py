"""Direct writes: aligned blocks bypass the page cache, everything else goes through it, and
the file holds the same bytes either way."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from importer.directio import ALIGNMENT, aligned_buffer, is_direct_writable
from importer.formats.base import Limits
from importer.formats.decoder import ImageDecoder
from importer.sinks.pvc import FileClaimTarget

MiB = 1 << 20


def resident_bytes(path: Path) -> int:
    """How much of the file is in the page cache (util-linux fincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def filled_buffer(data: bytes) -> memoryview:
    buffer = aligned_buffer(len(data))
    buffer[:] = data
    return memoryview(buffer)


def test_aligned_buffers_offsets_and_lengths_are_direct_writable() -> None:
    view = filled_buffer(os.urandom(MiB))
    assert is_direct_writable(0, view)
    assert is_direct_writable(7 * MiB, view[ALIGNMENT:])
    assert not is_direct_writable(512, view)  # offset
    assert not is_direct_writable(0, view[: MiB - 512])  # length
    assert not is_direct_writable(0, view[512 : 512 + ALIGNMENT])  # address
    assert not is_direct_writable(0, memoryview(bytes(MiB)))  # read-only memory
    assert not is_direct_writable(0, view[:0])


def test_a_claim_on_tmpfs_holds_the_bytes_whether_or_not_it_takes_o_direct() -> None:
    """Older kernels refuse O_DIRECT on tmpfs (the claim then writes through the page
    cache), newer ones take it; the image is the same."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this machine")
    claim = shm / f"claim-{os.getpid()}"
    target = FileClaimTarget(claim)
    try:
        data = os.urandom(MiB)
        target.write(0, filled_buffer(data))
        target.write(MiB, memoryview(data[:100]))
        target.commit(MiB + 100)
        assert (claim / "disk.img").read_bytes() == data + data[:100]
    finally:
        subprocess.run(["rm", "-rf", str(claim)], check=True)


def test_aligned_writes_skip_the_page_cache_and_the_rest_go_through_it(tmp_path: Path) -> None:
    target = FileClaimTarget(tmp_path / "claim")
    assert target.direct_fd is not None, "ext4 under the test directory takes O_DIRECT"
    aligned = os.urandom(8 * MiB)
    unaligned = os.urandom(MiB + 100)
    target.write(0, filled_buffer(aligned))
    target.write(8 * MiB, memoryview(unaligned))  # a bytes object: through the page cache
    assert resident_bytes(target.partial) <= len(unaligned) + 2 * ALIGNMENT
    target.commit(8 * MiB + len(unaligned))
    disk = (tmp_path / "claim" / "disk.img").read_bytes()
    assert disk == aligned + unaligned


def test_raw_stream_fed_in_odd_pieces_lands_byte_for_byte(tmp_path: Path) -> None:
    """The probe keeps the head and the raw stage holds back the tail; the blocks between
    are written directly, and the file is the stream whatever the cut points."""
    data = os.urandom(5 * MiB + 777)
    target = FileClaimTarget(tmp_path / "claim")
    decoder = ImageDecoder(target, Limits())
    block = aligned_buffer(MiB)
    for start in range(0, len(data), MiB):
        piece = data[start : start + MiB]
        block[: len(piece)] = piece
        decoder.feed(memoryview(block)[: len(piece)])
    info = decoder.finish()
    assert info.format == "raw" and info.virtual_size == len(data)
    # the holding back must not leave the bulk of the disk in the page cache
    assert resident_bytes(target.partial) < MiB
    target.commit(info.virtual_size)
    stored = (tmp_path / "claim" / "disk.img").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
