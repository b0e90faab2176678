"""What a process uses, read from /proc: peak memory, and CPU time per thread together with
the time each thread was ready to run but waited for a CPU."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int | None:
    """A `kB` field of /proc/PID/status (VmHWM, VmRSS, ...), in KiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


@dataclass(frozen=True)
class ThreadTimes:
    cpu: float  # seconds on a CPU
    wait: float = 0.0  # seconds runnable but waiting for a CPU (0 when the kernel won't say)

    def __sub__(self, other: ThreadTimes) -> ThreadTimes:
        return ThreadTimes(self.cpu - other.cpu, self.wait - other.wait)


_ZERO = ThreadTimes(0.0)


def _read_thread(task: str) -> ThreadTimes | None:
    try:
        cpu_ns, wait_ns, _ = Path(f"{task}/schedstat").read_text().split()
        return ThreadTimes(int(cpu_ns) / 1e9, int(wait_ns) / 1e9)
    except (OSError, ValueError):
        pass
    try:
        stat = Path(f"{task}/stat").read_text()
    except OSError:
        return None  # the thread ended between listing and reading
    fields = stat.rpartition(")")[2].split()
    return ThreadTimes((int(fields[11]) + int(fields[12])) / _TICK)


def thread_times(pid: int) -> dict[int, ThreadTimes]:
    """Times of every live thread of `pid`, by thread id."""
    result: dict[int, ThreadTimes] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for tid in tids:
        times = _read_thread(f"/proc/{pid}/task/{tid}")
        if times is not None:
            result[int(tid)] = times
    return result


@dataclass
class CpuUse:
    """One run: the main (event loop) thread and every other thread that did some work."""

    wall: float
    main: ThreadTimes
    others: list[ThreadTimes] = field(default_factory=list)  # most CPU first

    @property
    def cpu(self) -> float:
        return self.main.cpu + sum(t.cpu for t in self.others)

    @property
    def wait(self) -> float:
        return self.main.wait + sum(t.wait for t in self.others)


class Sampler:
    """Polls a process while a run goes on: peak RSS and the times of each thread.

    Threads that start and end within the run (the pipeline's lanes) are seen by polling;
    their times are the last values read, so each may be short by up to one interval.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss_kib = 0
        self._before: dict[int, ThreadTimes] = {}
        self._last: dict[int, ThreadTimes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._started = 0.0
        self._wall = 0.0

    def __enter__(self) -> Sampler:
        self._before = thread_times(self.pid)
        self._last = dict(self._before)
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self._wall = time.monotonic() - self._started

    def _poll(self) -> None:
        self._last.update(thread_times(self.pid))
        rss = status_kib(self.pid, "VmRSS")
        if rss is not None:
            self.peak_rss_kib = max(self.peak_rss_kib, rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def cpu(self) -> CpuUse:
        deltas = {tid: t - self._before.get(tid, _ZERO) for tid, t in self._last.items()}
        main = deltas.pop(self.pid, _ZERO)
        others = sorted((d for d in deltas.values() if d.cpu > 0.005), key=lambda t: -t.cpu)
        return CpuUse(self._wall, main, others)
