"""PVC targets: sparse file claims and in-place block claims."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from importer.directio import aligned_buffer
from importer.errors import ImageTooLarge
from importer.sinks.pvc import ZERO_GRANULE, BlockClaimTarget, FileClaimTarget, data_runs

MiB = 1 << 20


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A real 64 MiB block device (a loop device over a file full of 0xff: old data)."""
    backing = tmp_path / "backing"
    backing.write_bytes(b"\xff" * (64 * MiB))
    attached = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
    )
    if attached.returncode != 0:
        pytest.skip(f"no loop device on this machine: {attached.stderr.strip()}")
    device = Path(attached.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=True)


def test_data_runs_skip_zero_granules() -> None:
    data = bytearray(4 * ZERO_GRANULE)
    data[10] = 1
    data[3 * ZERO_GRANULE + 5] = 2
    runs = data_runs(0, data)
    assert [(offset, len(view)) for offset, view in runs] == [
        (0, ZERO_GRANULE),
        (3 * ZERO_GRANULE, ZERO_GRANULE),
    ]


def test_data_runs_align_to_file_offsets() -> None:
    data = b"\1" * ZERO_GRANULE
    runs = data_runs(100, data)
    assert [(offset, len(view)) for offset, view in runs] == [(100, ZERO_GRANULE)]
    zeros = bytes(2 * ZERO_GRANULE)
    assert data_runs(100, zeros) == []


def test_file_claim_is_sparse_exact_and_atomic(tmp_path: Path) -> None:
    claim = tmp_path / "claim"
    old = b"previous image"
    claim.mkdir()
    (claim / "disk.img").write_bytes(old)
    target = FileClaimTarget(claim)
    payload = os.urandom(MiB)
    target.write(0, payload)
    target.write(MiB, bytes(8 * MiB))
    target.write(9 * MiB, payload)
    assert (claim / "disk.img").read_bytes() == old  # untouched until commit
    target.commit(12 * MiB)
    disk = claim / "disk.img"
    assert disk.stat().st_size == 12 * MiB
    with open(disk, "rb") as f:
        assert f.read(MiB) == payload
        assert f.read(8 * MiB) == bytes(8 * MiB)
        assert f.read(MiB) == payload
        assert f.read() == bytes(2 * MiB)
    assert disk.stat().st_blocks * 512 <= 2 * MiB + 64 * 1024
    assert target.written == 2 * MiB
    assert not (claim / ".disk.img.partial").exists()


def test_file_claim_abort_leaves_previous_data(tmp_path: Path) -> None:
    claim = tmp_path / "claim"
    claim.mkdir()
    (claim / "disk.img").write_bytes(b"keep me")
    target = FileClaimTarget(claim)
    target.write(0, os.urandom(MiB))
    target.abort()
    assert (claim / "disk.img").read_bytes() == b"keep me"
    assert sorted(p.name for p in claim.iterdir()) == ["disk.img"]


def test_file_claim_capacity(tmp_path: Path) -> None:
    target = FileClaimTarget(tmp_path / "claim", capacity=MiB)
    with pytest.raises(ImageTooLarge, match="1048576"):
        target.declare_size(2 * MiB)
    with pytest.raises(ImageTooLarge):
        target.write(MiB - 10, b"x" * 20)
    target.abort()


def test_block_claim_writes_in_place_and_zeroes_stale_data(tmp_path: Path) -> None:
    device = tmp_path / "device"
    device.write_bytes(b"\xff" * (8 * MiB))  # stale contents everywhere
    target = BlockClaimTarget(device)
    assert target.capacity == 8 * MiB
    payload = os.urandom(MiB)
    target.write(0, payload + bytes(2 * MiB) + payload)
    target.commit(4 * MiB)
    data = device.read_bytes()
    assert len(data) == 8 * MiB
    assert data[:MiB] == payload
    assert data[MiB : 3 * MiB] == bytes(2 * MiB)
    assert data[3 * MiB : 4 * MiB] == payload
    assert data[4 * MiB :] == bytes(4 * MiB)


def test_block_claim_zeroes_what_no_write_covers(tmp_path: Path) -> None:
    """A converter skips unallocated clusters and may write out of order: the ranges no
    write covered read as zeros, not as the device's old contents."""
    device = tmp_path / "device"
    device.write_bytes(b"\xff" * (8 * MiB))
    target = BlockClaimTarget(device)
    first, last, early = os.urandom(MiB), os.urandom(MiB), os.urandom(4096)
    target.write(0, first)
    target.write(5 * MiB, last)  # 1-5 MiB skipped
    target.write(2 * MiB, early)  # back into the skipped range
    target.commit(6 * MiB)
    data = device.read_bytes()
    assert data[:MiB] == first
    assert data[MiB : 2 * MiB] == bytes(MiB)
    assert data[2 * MiB : 2 * MiB + 4096] == early
    assert data[2 * MiB + 4096 : 5 * MiB] == bytes(3 * MiB - 4096)
    assert data[5 * MiB : 6 * MiB] == last
    assert data[6 * MiB :] == bytes(2 * MiB)
    assert target.written == 2 * MiB + 4096


def test_a_block_device_is_written_directly_and_zeroed_where_the_image_has_nothing(
    loop_device: Path,
) -> None:
    target = BlockClaimTarget(loop_device)
    assert target.is_device
    assert target.capacity == 64 * MiB
    assert target.direct_fd is not None, "a block device takes O_DIRECT"
    head = os.urandom(8 * MiB)
    block = aligned_buffer(4 * MiB)
    block[:MiB] = head[:MiB]  # then 2 MiB of zeros, then data again
    block[3 * MiB :] = head[-MiB:]
    first = aligned_buffer(len(head))
    first[:] = head
    target.write(0, memoryview(first))
    target.write(16 * MiB, memoryview(block))  # 8-16 MiB never written
    target.write(20 * MiB, memoryview(b"tail"))  # unaligned: through the page cache
    target.commit(20 * MiB + 4)
    data = loop_device.read_bytes()
    assert len(data) == 64 * MiB
    assert data[: 8 * MiB] == head
    assert data[8 * MiB : 16 * MiB] == bytes(8 * MiB)
    assert data[16 * MiB : 20 * MiB] == bytes(block)
    assert data[20 * MiB : 20 * MiB + 4] == b"tail"
    assert data[20 * MiB + 4 :] == bytes(44 * MiB - 4)


def test_block_claim_too_small(tmp_path: Path) -> None:
    device = tmp_path / "device"
    device.write_bytes(bytes(MiB))
    target = BlockClaimTarget(device)
    with pytest.raises(ImageTooLarge, match="block claim"):
        target.declare_size(2 * MiB)
    target.abort()


def test_file_claim_zero_clears_what_was_written_and_costs_nothing_past_it(
    tmp_path: Path,
) -> None:
    target = FileClaimTarget(tmp_path / "claim")
    payload = os.urandom(2 * MiB)
    target.write(0, payload)
    target.zero(MiB // 2, MiB)  # within what was written: a hole
    target.zero(4 * MiB, 4 * MiB)  # past it: already zeros, nothing to do
    assert target.end == 2 * MiB
    target.flush()
    target.commit(8 * MiB)
    data = (tmp_path / "claim" / "disk.img").read_bytes()
    assert data == payload[: MiB // 2] + bytes(MiB) + payload[3 * MiB // 2 :] + bytes(6 * MiB)
    with pytest.raises(ImageTooLarge):
        FileClaimTarget(tmp_path / "small", capacity=MiB).zero(0, 2 * MiB)


def test_file_claim_extents(tmp_path: Path) -> None:
    target = FileClaimTarget(tmp_path / "claim")
    target.write(MiB, os.urandom(MiB))
    extents = target.extents(0, 4 * MiB)
    assert extents[0].offset == 0 and not extents[0].data
    assert sum(extent.length for extent in extents) == 4 * MiB
    assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(extents))
    data = [(extent.offset, extent.length) for extent in extents if extent.data]
    # The filesystem may report data in larger units, but covers what was written.
    assert data and data[0][0] <= MiB and data[-1][0] + data[-1][1] >= 2 * MiB
    assert not extents[-1].data
    target.abort()


def test_block_claim_zero_is_explicit(tmp_path: Path) -> None:
    device = tmp_path / "device"
    device.write_bytes(b"\xff" * (4 * MiB))
    target = BlockClaimTarget(device)
    payload = os.urandom(MiB)
    target.write(0, payload)
    target.zero(MiB // 2, 100)
    target.zero(2 * MiB, MiB)  # the gap before it holds old data too: zeroed with it
    assert target.end == 3 * MiB
    target.flush()
    target.abort()  # no commit: the tail keeps its old contents
    data = device.read_bytes()
    assert data[: MiB // 2] == payload[: MiB // 2]
    assert data[MiB // 2 : MiB // 2 + 100] == bytes(100)
    assert data[MiB // 2 + 100 : MiB] == payload[MiB // 2 + 100 :]
    assert data[MiB : 3 * MiB] == bytes(2 * MiB)
    assert data[3 * MiB :] == b"\xff" * MiB
