"""Uploads into PVC storage continue from their last checkpoint after the server dies."""

from __future__ import annotations

import gzip
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskimages import MiB, qemu_convert, sha256_file, write_disk_image
from serverproc import Server, curl, head_offset, manifest
from waiting import wait_until

EVERY = 8 * MiB


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "data", "--checkpoint-every", "8Mi").start()
    try:
        yield server
    finally:
        server.stop()


def cut_by_the_server_dying(srv: Server, image: Path, url: str, sig: int, at: int) -> None:
    """Sends `image` slowly and stops the server (with `sig`) once `at` bytes are in."""
    proc = subprocess.Popen(
        ["curl", "-sS", "-o", "/dev/null", "--limit-rate", "16M", "-T", str(image), url]
    )
    wait_until(lambda: head_offset(url) >= at, timeout=60, what=f"{at} bytes uploaded")
    srv.stop(sig)
    proc.wait(30)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_raw_upload_continues_after_the_server_dies(
    srv: Server, tmp_path: Path, sig: signal.Signals
) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 48 * MiB, seed=101)
    srv.create(manifest("big", checksum={"sha256": sha256}))
    url = srv.upload_url("big")
    cut_by_the_server_dying(srv, image, url, sig, at=3 * EVERY + MiB)

    srv.start()
    obj = srv.wait_phase("big", ("WaitForUserUpload",))
    offset = head_offset(url)
    if sig == signal.SIGKILL:  # the last periodic checkpoint
        assert offset >= 3 * EVERY and offset % EVERY == 0, offset
    else:  # SIGTERM: a checkpoint of everything taken before the stop
        assert offset >= 3 * EVERY + MiB, offset
    assert f"continues at byte {offset}" in obj["status"]["conditions"][0]["message"]
    code, body = curl("-C", str(offset), "-T", str(image), url)
    assert code == 200, body
    assert body["checksum"]["sha256"] == sha256
    assert sha256_file(srv.claim_dir("big") / "disk.img") == sha256


def packed_in_xz_blocks(image: Path) -> Path:
    """`image` compressed as `xz -T0` does: in blocks that give their sizes."""
    packed = image.with_name(image.name + ".xz")
    with open(packed, "wb") as out:
        subprocess.run(
            ["xz", "-T2", "-1", "--block-size=3MiB", "-c", str(image)], stdout=out, check=True
        )
    return packed


@pytest.mark.parametrize(
    ("packing", "sig"),
    [("none", signal.SIGKILL), ("xz", signal.SIGKILL), ("xz", signal.SIGTERM)],
)
def test_a_qcow2_upload_continues_after_the_server_dies(
    srv: Server, tmp_path: Path, packing: str, sig: signal.Signals
) -> None:
    """A qcow2 as it is, or inside an xz stream of blocks: such a stream is saved at the
    checkpoints like an uncompressed one, even in the middle of a block."""
    raw = tmp_path / "disk.raw"
    raw_sha256, _ = write_disk_image(raw, 64 * MiB, seed=102)
    image = qemu_convert(raw, "qcow2", tmp_path / "disk.qcow2")
    if packing == "xz":
        image = packed_in_xz_blocks(image)
    srv.create(manifest("q"))
    url = srv.upload_url("q")
    cut_by_the_server_dying(srv, image, url, sig, at=2 * EVERY + MiB)

    srv.start()
    srv.wait_phase("q", ("WaitForUserUpload",))
    offset = head_offset(url)
    assert offset >= 2 * EVERY, offset
    code, body = curl("-C", str(offset), "-T", str(image), url)
    assert code == 200, body
    assert body["checksum"]["sha256"] == sha256_file(image)
    assert body["format"] == "qcow2"
    assert sha256_file(srv.claim_dir("q") / "disk.img") == raw_sha256
    assert list((srv.data_dir / "spill").iterdir()) == []  # no spill file left behind


def test_a_compressed_stream_starts_over_after_a_kill(srv: Server, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw_sha256, _ = write_disk_image(raw, 48 * MiB, seed=103)
    packed = tmp_path / "disk.raw.gz"
    packed.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=1))
    srv.create(manifest("gz"))
    url = srv.upload_url("gz")
    cut_by_the_server_dying(srv, packed, url, signal.SIGKILL, at=2 * EVERY + MiB)

    srv.start()
    srv.wait_phase("gz", ("WaitForUserUpload",))
    assert head_offset(url) == 0  # a gzip stream's state cannot be saved
    assert not (srv.claim_dir("gz") / ".disk.img.partial").exists()
    code, body = curl("-T", str(packed), url)
    assert code == 200, body
    assert sha256_file(srv.claim_dir("gz") / "disk.img") == raw_sha256


def test_a_whole_upload_after_a_restart_starts_over(srv: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 40 * MiB, seed=104)
    srv.create(manifest("again"))
    url = srv.upload_url("again")
    cut_by_the_server_dying(srv, image, url, signal.SIGKILL, at=2 * EVERY + MiB)
    srv.start()
    srv.wait_phase("again", ("WaitForUserUpload",))
    assert head_offset(url) > 0
    code, body = curl("-T", str(image), url)  # no -C: from byte 0
    assert code == 200, body
    assert body["checksum"]["sha256"] == sha256
    assert sha256_file(srv.claim_dir("again") / "disk.img") == sha256
