"""The pipeline's lanes, taking the blocks in order on threads shared by every transfer.

A block is handed to every lane with one queue append per lane, and the event loop hears
back only when it waits for a block that is not done yet: while buffers are free, the
lanes' progress costs the loop nothing. (An executor future per lane and block, gathered,
cost as much of the loop's CPU as receiving the bytes.)

The lanes run on one process-wide pool of at most `max_threads` threads (`configure`).
A lane with jobs queued is drained by one worker at a time, so its jobs run strictly in
order; a worker that finds the lane's queue empty goes back to the pool. A transfer whose
source keeps it waiting (an upload waiting to be continued) therefore holds no thread,
and a crowd of transfers cannot make the process start one thread per lane.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence

from importer.lane import Lane


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

DEFAULT_MAX_THREADS = 64
# A worker that has run this many jobs of one lane while other lanes wait for a worker
# lets them go first (the lane goes to the back of the line).
TURN = 8
# A worker with nothing to do for this long ends; the next busy moment starts another.
IDLE_EXIT = 30.0


class LanePool:
    """At most `max_threads` threads that drain the lanes' queues, one lane at a time each."""

    def __init__(self, max_threads: int, idle_exit: float = IDLE_EXIT) -> None:
        if max_threads < 1:
            raise ValueError("a lane pool needs at least one thread")
        self.max_threads = max_threads
        self.idle_exit = idle_exit
        self._ready: queue.SimpleQueue[_LaneQueue] = queue.SimpleQueue()
        self._lock = threading.Lock()  # for the counts
        self._in_line = 0  # lanes put in `_ready` and not taken yet
        self._threads = 0
        self._idle = 0  # workers not draining a lane (waiting for one, or about to)

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        return self._threads

    @property
    def draining(self) -> int:
        """Workers running a lane's jobs now."""
        return self._threads - self._idle

    @property
    def lanes_waiting(self) -> bool:
        """Some lane in line finds no idle worker."""
        return self._in_line > self._idle

    def schedule(self, lane: _LaneQueue) -> None:
        """Puts a lane that has jobs in line; an idle worker takes it, or a new one if the
        bound allows (else the next worker that is done with its lane)."""
        with self._lock:
            self._in_line += 1
            start = self._in_line > self._idle and self._threads < self.max_threads
            if start:
                self._threads += 1
                self._idle += 1
        self._ready.put(lane)
        if start:
            threading.Thread(target=self._serve, name="lane-pool", daemon=True).start()

    def _serve(self) -> None:
        while (lane := self._next_lane()) is not None:
            try:
                lane.drain(self)
            finally:
                threading.current_thread().name = "lane-pool"
                with self._lock:
                    self._idle += 1

    def _next_lane(self) -> _LaneQueue | None:
        while True:
            try:
                lane = self._ready.get(timeout=self.idle_exit)
            except queue.Empty:
                with self._lock:
                    # Ends only if the other idle workers cover every lane in line (one may
                    # have been put there, counting on this worker, as it timed out).
                    if self._in_line < self._idle:
                        self._idle -= 1
                        self._threads -= 1
                        return None
                continue
            with self._lock:
                self._in_line -= 1
                self._idle -= 1
            return lane


_shared_pool: LanePool | None = None
_shared_lock = threading.Lock()


def configure(max_threads: int) -> None:
    """Bounds the threads of the lanes of every transfer started from now on (at server
    start: `--lane-threads`)."""
    global _shared_pool
    with _shared_lock:
        _shared_pool = LanePool(max_threads)


def shared_pool() -> LanePool:
    global _shared_pool
    with _shared_lock:
        if _shared_pool is None:
            _shared_pool = LanePool(DEFAULT_MAX_THREADS)
        return _shared_pool


class _LaneQueue:
    """One lane's jobs, in order; in the pool's line while it has some and no worker."""

    def __init__(self, lane: Lane, pool: LanePool) -> None:
        self.lane = lane
        self.pool = pool
        self.failed = False  # a lane that raised is not called again
        self.stopped = False  # the transfer is over: what is still queued is skipped
        self._jobs: collections.deque[_Job] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False  # in the pool's line or drained by a worker
        self._running = False
        self._stop_waits: threading.Event | None = None  # set once no job runs

    def submit(self, job: _Job) -> None:
        with self._lock:
            self._jobs.append(job)
            if self._scheduled:
                return
            self._scheduled = True
        self.pool.schedule(self)

    def drain(self, pool: LanePool) -> None:
        """In a pool worker: the lane's jobs in order, until there are none (or its turn
        is over while other lanes wait)."""
        threading.current_thread().name = f"lane-{self.lane.name}"
        ran = 0
        while True:
            with self._lock:
                if not self._jobs or (ran >= TURN and pool.lanes_waiting):
                    self._running = False
                    if self._stop_waits is not None:
                        self._stop_waits.set()
                    self._scheduled = bool(self._jobs)
                    if not self._scheduled:
                        return
                    break
                # Nothing here may keep the block once the lane is done with it (a waiting
                # transfer lets go of its spare blocks, see Pipeline), and the waiter hears
                # right after.
                fn, args, batch = self._jobs.popleft()
                self._running = True
            error = self._call(fn, args)
            del fn, args
            batch.lane_done(error)
            del batch
            ran += 1
        pool.schedule(self)

    def _call(self, fn: Callable[..., None], args: tuple[object, ...]) -> BaseException | None:
        if self.failed or self.stopped:
            return None
        try:
            fn(*args)
        except BaseException as exc:
            self.failed = True
            return exc
        return None

    def stop(self) -> None:
        """Skips what is queued; returns once the lane's job in progress, if any, is done."""
        with self._lock:
            self.stopped = True
            skipped = list(self._jobs)
            self._jobs.clear()
            if self._running:
                self._stop_waits = threading.Event()
        if self._stop_waits is not None:
            self._stop_waits.wait()
        for _fn, _args, batch in skipped:
            batch.lane_done(None)


class LaneThreads:
    """The lanes of one transfer, on the shared pool (or `pool`)."""

    def __init__(self, lanes: Sequence[Lane], pool: LanePool | None = None) -> None:
        pool = pool or shared_pool()
        self._queues = [_LaneQueue(lane, pool) for lane in lanes]
        self._lock = threading.Lock()
        self._ended = False

    def _each(self, method: Callable[[Lane], Callable[..., None]], *args: object) -> Batch:
        if self._ended:
            raise RuntimeError("the lanes of this transfer have ended")
        batch = Batch(asyncio.get_running_loop(), self._lock, len(self._queues))
        for lane_queue in self._queues:
            lane_queue.submit((method(lane_queue.lane), args, batch))
        return batch

    def update(self, data: memoryview) -> Batch:
        return self._each(lambda lane: lane.update, data)

    def finish(self) -> Batch:
        return self._each(lambda lane: lane.finish)

    def stop(self) -> None:
        """Skips what is queued and returns once no lane runs (blocks: call in a thread)."""
        for lane_queue in self._queues:
            lane_queue.stop()
        self.end()

    def end(self) -> None:
        """No more jobs: the transfer is over."""
        self._ended = True
