"""The lane threads on their own: order, errors, and what they keep."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref

import pytest
from waiting import wait_until_async

from importer.lanethreads import LanePool, LaneThreads


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


class Watched(Recorder):
    """A lane that notes each OS thread it ran on, and whether two ever ran it at once."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        super().__init__(name)
        self.delay = delay
        self.idents: set[int] = set()
        self.inside = 0
        self.overlapped = False

    def update(self, data: memoryview) -> None:
        self.inside += 1
        self.overlapped |= self.inside > 1
        self.idents.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)  # a slow lane, on purpose
        super().update(data)
        self.inside -= 1


async def test_many_lanes_on_a_pool_of_two_threads_all_complete_in_order() -> None:
    pool = LanePool(2)
    lanes = [Watched(f"l{i}", delay=0.001 if i % 5 == 0 else 0.0) for i in range(24)]
    transfers = [LaneThreads(lanes[i : i + 3], pool) for i in range(0, len(lanes), 3)]
    blocks = [bytes([i]) * 100 for i in range(40)]
    batches = [t.update(memoryview(block)) for block in blocks for t in transfers]
    batches += [t.finish() for t in transfers]
    await asyncio.gather(*(batch.wait() for batch in batches))
    for lane in lanes:
        assert lane.seen == blocks
        assert lane.finished
        assert not lane.overlapped
    assert len(set().union(*(lane.idents for lane in lanes))) <= 2
    assert pool.threads <= 2


async def test_a_lane_is_drained_by_one_worker_at_a_time() -> None:
    """Four workers, one lane fed faster than it works: never two workers on it at once."""
    pool = LanePool(4)
    lane = Watched("slow", delay=0.002)
    others = [Watched(f"o{i}") for i in range(3)]
    threads = LaneThreads([lane, *others], pool)
    blocks = [bytes([i]) * 10 for i in range(60)]
    batches = [threads.update(memoryview(block)) for block in blocks]
    await asyncio.gather(*(batch.wait() for batch in batches))
    assert lane.seen == blocks
    assert not lane.overlapped


async def test_idle_workers_end_and_come_back() -> None:
    pool = LanePool(3, idle_exit=0.1)
    threads = LaneThreads([Recorder("a"), Recorder("b")], pool)
    await threads.update(memoryview(b"x")).wait()
    assert 1 <= pool.threads <= 2
    await wait_until_async(lambda: pool.threads == 0, timeout=2.0, what="idle workers to end")
    await threads.update(memoryview(b"y")).wait()  # new workers for new jobs
    await threads.finish().wait()
    await wait_until_async(lambda: pool.draining == 0, timeout=2.0, what="no worker draining")


async def test_stop_skips_what_is_queued() -> None:
    pool = LanePool(1)
    lane = Watched("slow", delay=0.05)
    threads = LaneThreads([lane], pool)
    batches = [threads.update(memoryview(bytes([i]))) for i in range(10)]
    await wait_until_async(lambda: lane.inside == 1, what="the first job to run")
    await asyncio.to_thread(threads.stop)
    assert len(lane.seen) <= 2
    for batch in batches:
        await batch.wait()  # every batch is done, the skipped ones too
    with pytest.raises(RuntimeError):
        threads.update(memoryview(b"late"))
