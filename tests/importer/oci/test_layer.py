"""The tar layer written on the fly reads back with tarfile, whatever the size."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from importer.errors import ProvisioningFailed, TransferInterrupted
from importer.oci.layer import LayerLane, layer_head, layer_size, layer_tail, safe_filename


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self.data += data


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 100_000])
def test_layer_round_trip(size: int) -> None:
    payload = os.urandom(size)
    out = Collect()
    lane = LayerLane(out, "cirros.img", size)
    for i in range(0, size, 7000):
        lane.update(memoryview(payload[i : i + 7000]))
    lane.finish()
    assert lane.length == len(out.data) == layer_size("cirros.img", size)
    assert len(out.data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(bytes(out.data))) as tar:
        names = tar.getnames()
        member = tar.getmember("disk/cirros.img")
        assert tar.extractfile(member).read() == payload  # type: ignore[union-attr]
    assert names == ["disk", "disk/cirros.img"]


def test_sizes_past_the_ustar_limit_use_pax() -> None:
    size = 10 << 30
    head = layer_head("big.img", size)
    assert len(layer_tail(size)) == 2 * 512  # 10 GiB is a whole number of blocks
    fake = io.BytesIO(head)
    with tarfile.open(fileobj=fake, mode="r|") as tar:
        member = tar.next()
        member = tar.next()
        assert member is not None
        assert member.size == size


def test_length_must_match_the_announcement() -> None:
    lane = LayerLane(Collect(), "x", 10)
    with pytest.raises(ProvisioningFailed, match="more than the 10 bytes"):
        lane.update(memoryview(b"x" * 11))
    short = LayerLane(Collect(), "x", 10)
    short.update(memoryview(b"x" * 4))
    with pytest.raises(TransferInterrupted, match="4 of the 10"):
        short.finish()


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        (None, "disk.img"),
        ("", "disk.img"),
        ("/images/ubuntu-22.04.img", "ubuntu-22.04.img"),
        ("../../etc/passwd", "passwd"),
        ("..", "disk.img"),
        ("my image (1).qcow2", "my_image__1_.qcow2"),
    ],
)
def test_safe_filename(name: str | None, safe: str) -> None:
    assert safe_filename(name) == safe
