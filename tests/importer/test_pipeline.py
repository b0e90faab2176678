"""The pipeline on its own: lanes, checksums, backpressure, abort."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from waiting import wait_until_async

from importer import lanethreads
from importer.errors import BadImageChecksum, ImageTooLarge, InvalidImage
from importer.formats.base import ImageInfo
from importer.lanethreads import LanePool
from importer.pipeline import Checkpoint, Pipeline, PipelineOptions, TransferResult


class MemorySink:
    """Collects what its lane sees; can fail at a chosen block or be slow."""

    name = "memory"

    def __init__(self, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.data = bytearray()
        self.blocks = 0
        self.fail_at = fail_at
        self.delay = delay
        self.committed: TransferResult | None = None
        self.aborted = False
        self.threads: set[str] = set()

    def lanes(self) -> list[MemorySink]:
        return [self]

    def update(self, data: memoryview) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and self.blocks == self.fail_at:
            raise InvalidImage("broken on purpose")
        if self.delay:
            threading.Event().wait(self.delay)
        self.data += data
        self.blocks += 1

    def finish(self) -> None:
        pass

    def image_info(self) -> ImageInfo:
        return ImageInfo("raw", len(self.data))

    async def commit(self, result: TransferResult) -> None:
        self.committed = result

    async def abort(self) -> None:
        self.aborted = True


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await asyncio.sleep(0)


@pytest.mark.parametrize("chunk", [1000, 65536, 5 << 20])
async def test_every_byte_reaches_the_sink_in_order(chunk: int) -> None:
    data = os.urandom(9 << 20)
    sink = MemorySink()
    options = PipelineOptions(algorithms=("sha256", "md5"), block_size=1 << 20, depth=3)
    result = await Pipeline(sink, options).run(chunks(data, chunk))
    assert bytes(sink.data) == data
    assert result.received_bytes == len(data)
    assert result.checksums == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "md5": hashlib.md5(data).hexdigest(),
    }
    assert sink.committed is result
    assert not sink.aborted
    assert all(name.startswith("lane-memory") for name in sink.threads)


async def test_an_empty_source_is_no_image() -> None:
    sink = MemorySink()
    with pytest.raises(InvalidImage, match="empty"):
        await Pipeline(sink, PipelineOptions()).run(chunks(b"", 1))
    assert sink.aborted
    assert sink.committed is None


async def test_a_source_shorter_than_announced_is_no_image() -> None:
    sink = MemorySink()
    options = PipelineOptions(expected_length=3 << 20)
    with pytest.raises(InvalidImage, match=f"after {2 << 20} of the {3 << 20} bytes"):
        await Pipeline(sink, options).run(chunks(os.urandom(2 << 20), 65536))
    assert sink.aborted


async def test_an_empty_disk_is_no_image() -> None:
    """Bytes arrived, but the disk they make is empty (a format whose virtual size is 0)."""

    class EmptyDisk(MemorySink):
        def image_info(self) -> ImageInfo:
            return ImageInfo("qcow2", 0)

    sink = EmptyDisk()
    with pytest.raises(InvalidImage, match="empty disk"):
        await Pipeline(sink, PipelineOptions()).run(chunks(os.urandom(4096), 4096))
    assert sink.committed is None


async def test_checksum_mismatch_aborts() -> None:
    data = os.urandom(3 << 20)
    sink = MemorySink()
    options = PipelineOptions(expected_checksums={"sha256": "0" * 64})
    with pytest.raises(BadImageChecksum, match="sha256"):
        await Pipeline(sink, options).run(chunks(data, 65536))
    assert sink.aborted
    assert sink.committed is None


async def test_a_failing_lane_aborts_the_transfer() -> None:
    sink = MemorySink(fail_at=2)
    options = PipelineOptions(block_size=1 << 20, depth=2)
    with pytest.raises(InvalidImage, match="on purpose"):
        await Pipeline(sink, options).run(chunks(os.urandom(16 << 20), 1 << 20))
    assert sink.aborted
    assert sink.blocks == 2


async def test_limit_on_received_bytes() -> None:
    sink = MemorySink()
    options = PipelineOptions(max_received_bytes=2 << 20)
    with pytest.raises(ImageTooLarge):
        await Pipeline(sink, options).run(chunks(os.urandom(3 << 20), 65536))
    assert sink.aborted


async def test_backpressure_stops_reading_the_source() -> None:
    """With a slow lane, the source is read at most `depth` blocks ahead of it."""
    block = 1 << 20
    sink = MemorySink(delay=0.02)
    options = PipelineOptions(block_size=block, depth=3)
    ahead: list[int] = []

    async def source() -> AsyncIterator[bytes]:
        sent = 0
        for _ in range(40):
            ahead.append(sent - len(sink.data))
            yield bytes(block)
            sent += block

    await Pipeline(sink, options).run(source())
    # depth buffers in flight plus the one being filled
    assert max(ahead) <= (3 + 1) * block


async def test_a_waiting_source_leaves_the_transfer_one_buffer() -> None:
    """A source that delivered fast, then waits (an upload waiting to be continued): the
    transfer lets go of every buffer but the one being filled, and takes new ones once the
    bytes flow again; nothing is lost on the way."""
    block = 1 << 20
    sink = MemorySink(delay=0.01)
    options = PipelineOptions(block_size=block, depth=4, idle_after=0.1)
    pipeline = Pipeline(sink, options)
    data = os.urandom(13 * block + 4321)
    go_on = asyncio.Event()
    held: list[int] = []

    async def source() -> AsyncIterator[bytes]:
        yield data[: 6 * block + 100]
        held.append(pipeline.buffers)
        await go_on.wait()
        yield data[6 * block + 100 :]

    task = asyncio.create_task(pipeline.run(source()))
    await wait_until_async(lambda: held, what="the source to wait")
    # The lanes finish the blocks in flight, then they go.
    await wait_until_async(lambda: pipeline.buffers == 1, what="the transfer to hold one buffer")
    go_on.set()
    result = await task
    assert held[0] == 4
    assert bytes(sink.data) == data
    assert result.checksums["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.fixture
def two_lane_threads() -> Iterator[LanePool]:
    """The process-wide lane pool, bounded to two threads for the test."""
    lanethreads.configure(2)
    try:
        yield lanethreads.shared_pool()
    finally:
        lanethreads.configure(lanethreads.DEFAULT_MAX_THREADS)


async def test_waiting_transfers_hold_no_thread(two_lane_threads: LanePool) -> None:
    """Ten transfers (three lanes each) whose sources wait, as parked uploads do: no lane
    holds a thread meanwhile, the process has no more threads than the pool's two, and
    every transfer completes once its bytes flow again."""
    pool = two_lane_threads
    before = threading.active_count()
    block = 1 << 20
    go_on = asyncio.Event()
    data = [os.urandom(3 * block + i) for i in range(10)]
    delivered = 0

    async def source(image: bytes) -> AsyncIterator[bytes]:
        nonlocal delivered
        yield image[: 2 * block]
        delivered += 1
        await go_on.wait()
        yield image[2 * block :]

    sinks = [MemorySink() for _ in data]
    options = PipelineOptions(algorithms=("sha256", "md5"), block_size=block, depth=2)
    tasks = [
        asyncio.create_task(Pipeline(sink, options).run(source(image)))
        for sink, image in zip(sinks, data, strict=True)
    ]
    await wait_until_async(
        lambda: delivered == len(data) and not pool.draining,
        what="every source to wait and every lane to be idle",
    )
    assert pool.threads <= 2
    assert threading.active_count() <= before + 2
    go_on.set()
    results = await asyncio.gather(*tasks)
    for sink, image, result in zip(sinks, data, results, strict=True):
        assert bytes(sink.data) == image
        assert result.checksums["md5"] == hashlib.md5(image).hexdigest()


async def test_cancellation_waits_for_lanes_and_aborts() -> None:
    sink = MemorySink(delay=0.05)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield bytes(1 << 20)

    task = asyncio.create_task(Pipeline(sink, PipelineOptions(block_size=1 << 20)).run(endless()))
    await wait_until_async(lambda: sink.blocks >= 2, what="the lanes to be working")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sink.aborted
    blocks = sink.blocks
    await asyncio.sleep(0.2)  # on purpose: long enough for a lane still running to show
    assert sink.blocks == blocks  # no lane is still working


# -- checkpoints ------------------------------------------------------------------------------


async def test_checkpoints_carry_the_hashes_to_a_new_pipeline() -> None:
    data = os.urandom(11 * (1 << 20) + 12345)
    seen: list[Checkpoint] = []

    async def record(checkpoint: Checkpoint) -> None:
        seen.append(checkpoint)

    options = PipelineOptions(
        algorithms=("sha256", "md5"),
        block_size=1 << 20,  # checkpoints fall on block boundaries
        checkpoint_every=3 << 20,
        on_checkpoint=record,
    )
    whole = await Pipeline(MemorySink(), options).run(chunks(data, 700_000))
    assert [c.offset for c in seen] == [3 << 20, 6 << 20, 9 << 20]
    assert all(c.sink is None for c in seen)  # this sink has no snapshot

    # A second pipeline, as after a restart, continues from the second checkpoint.
    checkpoint = seen[1]
    sink = MemorySink()
    resumed = await Pipeline(
        sink,
        PipelineOptions(algorithms=("sha256", "md5"), resume_from=checkpoint),
    ).run(chunks(data[checkpoint.offset :], 500_000))
    assert resumed.checksums == whole.checksums
    assert resumed.checksums["sha256"] == hashlib.sha256(data).hexdigest()
    assert resumed.received_bytes == len(data)
    assert bytes(sink.data) == data[checkpoint.offset :]
