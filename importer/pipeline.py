"""One pass from a source of bytes to a sink: count, checksum, decode, store.

The source fills large blocks from a small pool of reused buffers (a socket's bytes go
straight into them, see importer.sources.transportbody). Every
block goes to each *lane* (a consumer: one per hash, one for the sink's decoding and
writing), in order, on threads shared by all transfers (importer.lanethreads). Lanes run
in parallel with each other and with the
receiving; the hashes (libcrypto through ctypes), zlib and os.pwrite release the GIL on
large buffers, so both cores work.
When every buffer is in flight, the pipeline waits for the oldest block to be done before
reading more from the source: that is the backpressure that reaches the socket. Memory per
transfer is bounded by `block_size * depth`, whatever the size of the image, and a transfer
whose source keeps it waiting (a broken upload waiting to be continued) holds one block
and no thread.
"""

from __future__ import annotations

import asyncio
import collections
import mmap
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from importer.checksums import ChecksumLane, verify_checksums
from importer.directio import aligned_buffer
from importer.errors import ImageTooLarge, InvalidImage, Suspended, TransferError
from importer.formats.base import ImageInfo
from importer.lane import Lane
from importer.lanethreads import Batch, LaneThreads
from importer.progress import Progress
from importer.sources.reader import ByteStream, Reader, as_reader

# Measured in bench/: with direct writes (no copy into the page cache) 2 MiB blocks cost the
# loop and the writer less per byte than 1 MiB ones (+40% for qcow2, +13% for eight uploads
# at once); 4 MiB gained nothing more. Eight in flight rather than four: +10-20% for a
# single fast upload, at most 16 MiB per transfer.
BLOCK_SIZE = 2 << 20
DEPTH = 8
# A read from the source that has waited this long (an upload waiting to be continued, a
# stalled server) lets go of the buffers it is not filling: a waiting transfer holds one.
IDLE_AFTER = 1.0


class Sink(Protocol):
    """Where the image goes. Its lanes see the received bytes; `commit` makes the result
    durable and visible once everything is in and checked; `abort` leaves nothing behind."""

    def lanes(self) -> Sequence[Lane]: ...

    def image_info(self) -> ImageInfo: ...

    async def commit(self, result: TransferResult) -> None: ...

    async def abort(self) -> None: ...


@runtime_checkable
class SnapshottableSink(Sink, Protocol):
    """A sink whose partial result can be saved, for the transfer to continue from a
    checkpoint in another process (see `Checkpoint`)."""

    def snapshot(self) -> bytes | None:
        """The sink's state at the bytes fed so far, durable once it returns; None when
        this stream cannot be continued. Called only while no lane runs."""
        ...


@dataclass
class TransferResult:
    received_bytes: int
    checksums: dict[str, str]
    image: ImageInfo
    stored_bytes: int = 0  # what the storage holds, as the sink reports it
    written_bytes: int = 0


@dataclass
class Checkpoint:
    """Where a transfer can continue from after a restart: `offset` bytes of the source are
    through every lane, the hashes' states are saved and the sink's data is durable."""

    offset: int
    hashes: dict[str, bytes]
    sink: bytes | None  # the sink's own snapshot, when it has one


@dataclass
class PipelineOptions:
    algorithms: tuple[str, ...] = ("sha256",)
    expected_checksums: dict[str, str] = field(default_factory=dict)
    expected_length: int | None = None  # when the sender announced it
    max_received_bytes: int | None = None
    block_size: int = BLOCK_SIZE
    depth: int = DEPTH
    # Every this many bytes the lanes are drained and `on_checkpoint` hears of a Checkpoint.
    checkpoint_every: int | None = None
    on_checkpoint: Callable[[Checkpoint], Awaitable[None]] | None = None
    resume_from: Checkpoint | None = None  # continue a transfer at its checkpoint
    idle_after: float = IDLE_AFTER


class Pipeline:
    def __init__(
        self,
        sink: Sink,
        options: PipelineOptions,
        progress: Progress | None = None,
    ) -> None:
        self.sink = sink
        self.options = options
        self.progress = progress or Progress(total=options.expected_length)
        resume = options.resume_from
        self.start = resume.offset if resume else 0
        self.checksums = [
            ChecksumLane.resume(name, resume.hashes[name]) if resume else ChecksumLane(name)
            for name in options.algorithms
        ]
        self._dispatched = self.start
        self._next_checkpoint = self._checkpoint_after(self.start)
        self._lanes = LaneThreads([*self.checksums, *sink.lanes()])
        self._free: list[mmap.mmap] = []
        self._allocated = 0
        self._in_flight: collections.deque[tuple[Batch, mmap.mmap]] = collections.deque()
        self._idle: asyncio.TimerHandle | None = None

    @property
    def buffers(self) -> int:
        """How many block buffers the transfer holds now."""
        return self._allocated

    async def run(self, source: ByteStream) -> TransferResult:
        """Stream the source through every lane into the sink; returns once committed."""
        try:
            received = await self._pump(as_reader(source))
            self._check_complete(received)
            await self._drain()
            await self._lanes.finish().wait()
            checksums = {lane.algorithm: lane.hexdigest() for lane in self.checksums}
            verify_checksums(checksums, self.options.expected_checksums)
            info = self.sink.image_info()
            if info.virtual_size == 0:
                raise InvalidImage(f"the {info.format} image holds an empty disk (0 bytes)")
            result = TransferResult(received, checksums, info)
            await self.sink.commit(result)
            return result
        except BaseException:
            await self._stop_lanes()
            await self.sink.abort()
            raise
        finally:
            self._lanes.end()
            # The buffers go now, even if an exception's traceback keeps this object alive.
            self._free.clear()
            self._in_flight.clear()

    def _check_complete(self, received: int) -> None:
        """No disk is empty, and none is shorter than its sender announced."""
        if received == 0:
            raise InvalidImage("the image is empty: no bytes arrived")
        expected = self.options.expected_length
        if expected is not None and received < expected:
            raise InvalidImage(
                f"the image ended after {received} of the {expected} bytes announced"
            )

    def _checkpoint_after(self, offset: int) -> int | None:
        every = self.options.checkpoint_every
        if not every or self.options.on_checkpoint is None:
            return None
        return (offset // every + 1) * every

    async def _checkpoint(self) -> None:
        """Drains the lanes and reports where the transfer stands (between two blocks)."""
        assert self.options.on_checkpoint is not None
        await self._drain()
        # The lane threads are idle now, so another thread may look at the sink's state.
        sink_state = None
        if isinstance(self.sink, SnapshottableSink):
            sink_state = await asyncio.to_thread(self.sink.snapshot)
        hashes = {lane.algorithm: lane.state() for lane in self.checksums}
        await self.options.on_checkpoint(Checkpoint(self._dispatched, hashes, sink_state))
        self._next_checkpoint = self._checkpoint_after(self._dispatched)

    async def _pump(self, source: Reader) -> int:
        """Has the source fill one block after another, dispatching each full one."""
        limit = self.options.max_received_bytes
        block = await self._take_buffer()
        filled = 0
        received = self.start
        try:
            while n := await self._read(source, memoryview(block)[filled:]):
                received += n
                if limit is not None and received > limit:
                    raise ImageTooLarge(f"the upload is larger than the limit of {limit} bytes")
                self.progress.add(n)
                filled += n
                if filled == len(block):
                    self._dispatch(block, filled)
                    if self._next_checkpoint and self._dispatched >= self._next_checkpoint:
                        await self._checkpoint()
                    block = await self._take_buffer()
                    filled = 0
        except Suspended:
            if filled:
                self._dispatch(block, filled)
            if self.options.on_checkpoint is not None:
                await self._checkpoint()
            raise
        if filled:
            self._dispatch(block, filled)
        else:
            self._free.append(block)
        return received

    async def _read(self, source: Reader, view: memoryview) -> int:
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.options.idle_after, self._let_go_of_spare_buffers)
        try:
            return await source.readinto(view)
        finally:
            self._idle.cancel()
            self._idle = None

    def _let_go_of_spare_buffers(self) -> None:
        """While a read waits: drops the free buffers and those whose block every lane is
        done with (a lane's error stays queued for the pump to raise), and looks again
        later for those still in flight."""
        while self._in_flight and self._in_flight[0][0].done and not self._in_flight[0][0].failed:
            self._in_flight.popleft()
            self._allocated -= 1
        self._allocated -= len(self._free)
        self._free.clear()
        if self._in_flight:
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(self.options.idle_after, self._let_go_of_spare_buffers)

    def _dispatch(self, block: mmap.mmap, length: int) -> None:
        self._dispatched += length
        view = memoryview(block)[:length]
        self._in_flight.append((self._lanes.update(view), block))

    async def _take_buffer(self) -> mmap.mmap:
        while self._in_flight and self._in_flight[0][0].done:
            await self._reclaim_oldest()
        if not self._free and self._allocated < self.options.depth:
            # Made when first needed: a transfer whose lanes keep up with its sender (a
            # slow link) holds two. Page-aligned, so the sink may write them with O_DIRECT.
            self._allocated += 1
            return aligned_buffer(self.options.block_size)
        while not self._free:
            await self._reclaim_oldest()
        return self._free.pop()

    async def _reclaim_oldest(self) -> None:
        """Waits for the oldest block in flight; raises what a lane raised on it."""
        batch, block = self._in_flight.popleft()
        await batch.wait()
        self._free.append(block)

    async def _drain(self) -> None:
        while self._in_flight:
            await self._reclaim_oldest()

    async def _stop_lanes(self) -> None:
        """Skip the blocks still queued and wait until no lane thread touches the sink."""
        await asyncio.shield(asyncio.to_thread(self._lanes.stop))
        self._in_flight.clear()


__all__ = [
    "Checkpoint",
    "Lane",
    "Pipeline",
    "PipelineOptions",
    "Sink",
    "SnapshottableSink",
    "TransferError",
    "TransferResult",
]
