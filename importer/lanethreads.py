"""The pipeline's lanes, each on a thread of its own, taking the blocks in order.

A block is handed to every lane with one queue put per lane, and the event loop hears
back only when it waits for a block that is not done yet: while buffers are free, the
lanes' progress costs the loop nothing. (An executor future per lane and block, gathered,
cost as much of the loop's CPU as receiving the bytes.)
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importer.pipeline import Lane


class Batch:
    """One call made on every lane: done once each lane has returned from it."""

    __slots__ = ("_error", "_lock", "_loop", "_pending", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, lock: threading.Lock, lanes: int) -> None:
        self._loop = loop
        self._lock = lock
        self._pending = lanes
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def lane_done(self, error: BaseException | None) -> None:
        """From a lane's thread."""
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._pending -= 1
            waiter = self._waiter if self._pending == 0 else None
        if waiter is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                self._loop.call_soon_threadsafe(_settle, waiter)

    @property
    def done(self) -> bool:
        return self._pending == 0

    @property
    def failed(self) -> bool:
        """A lane raised on this call (`wait()` raises it)."""
        return self._error is not None

    async def wait(self) -> None:
        """Until every lane is done; raises the first error a lane raised."""
        with self._lock:
            if self._pending:
                self._waiter = self._loop.create_future()
        if self._waiter is not None:
            await self._waiter
        if self._error is not None:
            raise self._error


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_Job = tuple[Callable[..., None], tuple[object, ...], Batch]


class _LaneThread:
    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.failed = False  # a lane that raised is not called again
        self.stopped = False  # the transfer is over: what is still queued is skipped
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"lane-{lane.name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, batch = job
            # Nothing here may keep the block once the lane is done with it (a waiting
            # transfer lets go of its spare blocks, see Pipeline), and the waiter hears
            # right after.
            del job
            error = self._call(fn, args)
            del fn, args
            batch.lane_done(error)

    def _call(self, fn: Callable[..., None], args: tuple[object, ...]) -> BaseException | None:
        if self.failed or self.stopped:
            return None
        try:
            fn(*args)
        except BaseException as exc:
            self.failed = True
            return exc
        return None

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def end(self) -> None:
        self._jobs.put(None)

    def join(self) -> None:
        self._thread.join()


class LaneThreads:
    def __init__(self, lanes: Sequence[Lane]) -> None:
        self._threads = [_LaneThread(lane) for lane in lanes]
        self._lock = threading.Lock()
        self._ended = False

    def _each(self, method: Callable[[Lane], Callable[..., None]], *args: object) -> Batch:
        batch = Batch(asyncio.get_running_loop(), self._lock, len(self._threads))
        for thread in self._threads:
            thread.submit((method(thread.lane), args, batch))
        return batch

    def update(self, data: memoryview) -> Batch:
        return self._each(lambda lane: lane.update, data)

    def finish(self) -> Batch:
        return self._each(lambda lane: lane.finish)

    def stop(self) -> None:
        """Skips what is queued and returns once no lane runs (blocks: call in a thread)."""
        for thread in self._threads:
            thread.stopped = True
        self.end()
        for thread in self._threads:
            thread.join()

    def end(self) -> None:
        """The threads exit once through their queues."""
        if not self._ended:
            self._ended = True
            for thread in self._threads:
                thread.end()
