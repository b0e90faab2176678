"""Telling a disk in use from a free one, with real qemu processes and real locks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from importer.sources.disklock import disk_in_use, hold_for_reading

HOLDERS = {
    "lockf": "fcntl.lockf(f, fcntl.LOCK_EX)",
    "flock": "fcntl.flock(f, fcntl.LOCK_EX)",
}


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


@contextmanager
def held(command: list[str], ready_line: str, ask: str = "") -> Iterator[None]:
    """The command runs, holding the disk, from when it has printed `ready_line` (after
    being sent `ask`) until the block ends."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if ask:
            proc.stdin.write(ask)
            proc.stdin.flush()
        assert proc.stdout.readline().strip() == ready_line
        yield
    finally:
        proc.stdin.close()
        proc.wait(10)


def qemu_io(disk: Path, *flags: str) -> AbstractContextManager[None]:
    """qemu-io with the disk open (and locked), once it has answered a first command."""
    return held(
        ["qemu-io", *flags, "-f", "raw", str(disk)], ready_line="qemu-io> 1 MiB", ask="length\n"
    )


def test_a_free_disk(disk: Path) -> None:
    assert disk_in_use(disk) is None


def test_qemu_writing_holds_it(disk: Path) -> None:
    with qemu_io(disk):
        assert disk_in_use(disk) == "a qemu process holds it open for writing"
    assert disk_in_use(disk) is None


def test_qemu_reading_does_not(disk: Path) -> None:
    with qemu_io(disk, "-r"):
        assert disk_in_use(disk) is None


@pytest.mark.parametrize("how", sorted(HOLDERS))
def test_other_exclusive_locks_hold_it(disk: Path, how: str) -> None:
    script = (
        f"import fcntl,sys; f=open(sys.argv[1],'r+b'); {HOLDERS[how]}; "
        "print('ok', flush=True); sys.stdin.read()"
    )
    with held([sys.executable, "-c", script, str(disk)], "ok"):
        assert "lock" in (disk_in_use(disk) or "")
    assert disk_in_use(disk) is None


def test_reading_keeps_writers_out_but_not_readers(disk: Path) -> None:
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert hold_for_reading(fd)
        writer = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4k", str(disk)], capture_output=True, text=True
        )
        assert writer.returncode != 0
        assert 'Failed to get "write" lock' in writer.stderr
        reader = subprocess.run(
            ["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", str(disk)], capture_output=True
        )
        assert reader.returncode == 0
    finally:
        os.close(fd)
    writer = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", str(disk)])
    assert writer.returncode == 0


def test_holding_fails_while_qemu_writes(disk: Path) -> None:
    with qemu_io(disk):
        fd = os.open(disk, os.O_RDONLY)
        try:
            assert not hold_for_reading(fd)
        finally:
            os.close(fd)
