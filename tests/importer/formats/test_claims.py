"""The one-pass layout engine under the VMDK, VDI, VHD and VHDX converters."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from importer.errors import InvalidImage, UnsupportedFormat
from importer.formats import claims as layout
from importer.formats.base import Limits
from importer.formats.claims import RunMap, StreamLayout
from importer.formats.spill import Spill


class MemoryTarget:
    def __init__(self) -> None:
        self.writes: dict[int, bytes] = {}

    def declare_size(self, virtual_size: int) -> None:
        pass

    def write(self, offset: int, data: memoryview) -> None:
        self.writes[offset] = bytes(data)


def feed(engine: StreamLayout, data: bytes, rnd: random.Random) -> None:
    pos = 0
    while pos < len(data):
        n = rnd.randint(1, 300)
        engine.feed(memoryview(data)[pos : pos + n])
        pos += n


def test_spill_moves_to_a_side_file_and_splits(tmp_path: Path) -> None:
    spill = Spill(memory_limit=1000, directory=str(tmp_path))
    data = bytes(range(256)) * 20
    for pos in range(0, len(data), 700):
        spill.add(pos, memoryview(data)[pos : pos + 700])
    assert spill.memory <= 1000
    assert spill.covers(0, len(data))
    assert not spill.covers(0, len(data) + 1)
    got = b"".join(bytes(piece) for _, piece in spill.pop(500, 3000))
    assert got == data[500:3000]
    assert not spill.covers(499, 501)
    assert spill.covers(0, 500) and spill.covers(3000, len(data))
    assert b"".join(bytes(p) for _, p in spill.pop(3000, len(data))) == data[3000:]
    spill.clear()
    assert not spill.covers(0, 1)


def test_claims_before_their_table_are_served_from_the_spill() -> None:
    """A table at the end places data that came before it."""
    target = MemoryTarget()
    engine = StreamLayout("test", target, Limits())
    data = bytearray(b"D" * 100 + b"E" * 100 + b"padding!" + b"T" * 8)

    def on_table(_: bytes) -> None:
        engine.place(100, 100, 5000, "block 1")
        engine.place(0, 100, 0, "block 0")
        engine.complete = True

    engine.capture(208, 8, "the table", on_table)
    feed(engine, bytes(data), random.Random(1))
    engine.finish()
    assert target.writes == {0: b"D" * 100, 5000: b"E" * 100}
    assert engine.spill.memory == 0


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ([(0, 10), (5, 10)], "overlaps"),  # overlapping claims
        ([(0, 10), (0, 10)], "overlaps"),  # the same bytes twice
    ],
)
def test_overlapping_claims_are_refused(claims: list[tuple[int, int]], message: str) -> None:
    engine = StreamLayout("test", MemoryTarget(), Limits())
    for number, (start, length) in enumerate(claims):
        engine.place(start, length, number * 100, f"block {number}")
    engine.complete = True
    with pytest.raises(InvalidImage, match=message):
        engine.feed(memoryview(bytes(64)))


def test_a_claim_on_dropped_bytes_is_refused() -> None:
    engine = StreamLayout("test", MemoryTarget(), Limits())
    engine.complete = True
    engine.feed(memoryview(bytes(64)))
    engine.place(10, 10, 0, "a late block")
    with pytest.raises(InvalidImage, match="a late block at 0xa-0x14 overlaps"):
        engine.feed(memoryview(bytes(1)))


def test_truncation_names_the_missing_part() -> None:
    engine = StreamLayout("test", MemoryTarget(), Limits())
    engine.place(50, 100, 0, "block 7")
    engine.complete = True
    engine.feed(memoryview(bytes(120)))
    with pytest.raises(InvalidImage, match=r"ends at byte 0x78, but block 7 spans 0x32-0x96"):
        engine.finish()


def test_stream_claims_deliver_whole_units() -> None:
    engine = StreamLayout("test", MemoryTarget(), Limits())
    seen: list[tuple[int, bytes]] = []
    ended: list[bool] = []
    engine.stream(
        3, 40, "a table", 8, lambda rel, piece: seen.append((rel, bytes(piece))),
        lambda: ended.append(True),
    )  # fmt: skip
    data = bytes(range(50))
    feed(engine, data, random.Random(2))
    engine.finish()
    assert ended == [True]
    assert all(len(piece) % 8 == 0 for _, piece in seen)
    assert b"".join(piece for _, piece in seen) == data[3:43]
    assert [rel for rel, _ in seen] == sorted(rel for rel, _ in seen)


def test_run_map_merges_and_sorts() -> None:
    runs = RunMap("test")
    runs.add(512, 0, 512)
    runs.add(1024, 512, 512)  # contiguous on both sides: merged
    runs.add(4096, 8192, 512)
    assert list(runs.in_stream_order()) == [(512, 0, 1024), (4096, 8192, 512)]
    shuffled = RunMap("test", merge=False)
    order = list(range(3000))
    random.Random(3).shuffle(order)
    for i in order:
        shuffled.add(i * 1024, i * 2048, 512)
    assert [start for start, _, _ in shuffled.in_stream_order()] == [i * 1024 for i in range(3000)]
    assert all(guest == 2 * start for start, guest, _ in shuffled.in_stream_order())


def test_run_map_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidImage, match="past any possible file size"):
        RunMap("test").add(1 << 60, 0, 512)
    monkeypatch.setattr(layout, "MAX_RUNS", 4)
    runs = RunMap("test", merge=False)
    for i in range(4):
        runs.add(i * 1024, 0, 512)
    with pytest.raises(UnsupportedFormat, match="more than 4 separate pieces"):
        runs.add(8192, 0, 512)
