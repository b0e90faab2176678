"""The lane threads on their own: order, errors, and what they keep."""

from __future__ import annotations

import threading
import weakref

import pytest

from importer.lanethreads import LaneThreads


class Recorder:
    """A lane that records what it saw, and in which thread."""

    def __init__(self, name: str, fail_on: bytes | None = None) -> None:
        self.name = name
        self.fail_on = fail_on
        self.seen: list[bytes] = []
        self.threads: set[str] = set()
        self.finished = False

    def update(self, data: memoryview) -> None:
        self.threads.add(threading.current_thread().name)
        if data.tobytes() == self.fail_on:
            raise ValueError("failed on purpose")
        self.seen.append(data.tobytes())

    def finish(self) -> None:
        self.finished = True


class Block(bytearray):
    """A bytearray that can be watched with a weak reference."""


async def test_every_lane_sees_every_block_in_order_on_its_own_thread() -> None:
    lanes = [Recorder("a"), Recorder("b")]
    threads = LaneThreads(lanes)
    blocks = [bytes([i]) * 10 for i in range(20)]
    batches = [threads.update(memoryview(block)) for block in blocks]
    for batch in batches:
        await batch.wait()
    await threads.finish().wait()
    threads.end()
    for lane in lanes:
        assert lane.seen == blocks
        assert lane.finished
        assert lane.threads == {f"lane-{lane.name}"}


async def test_a_lane_that_raised_is_not_called_again_and_the_error_reaches_the_waiter() -> None:
    failing, other = Recorder("failing", fail_on=b"2"), Recorder("other")
    threads = LaneThreads([failing, other])
    batches = [threads.update(memoryview(bytes(str(i), "ascii"))) for i in range(4)]
    await batches[1].wait()
    with pytest.raises(ValueError, match="on purpose"):
        await batches[2].wait()
    assert batches[2].failed
    await batches[3].wait()  # the error was that of the third block only
    threads.end()
    assert failing.seen == [b"0", b"1"]
    assert other.seen == [b"0", b"1", b"2", b"3"]


async def test_a_done_block_is_not_kept_by_the_threads() -> None:
    """Once every lane is done with a block, nothing in the lane threads refers to it: a
    transfer that lets go of its buffers gets the memory back while the threads wait."""
    threads = LaneThreads([Recorder("a"), Recorder("b")])
    block = Block(b"x" * 4096)
    gone = weakref.ref(block)
    await threads.update(memoryview(block)).wait()
    del block
    assert gone() is None
    threads.end()
