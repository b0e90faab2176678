"""A deliberately slow target, for tests and benchmarks of backpressure.

Fault injection, not a feature: a real slow disk cannot be arranged on a test machine,
so `DVCR_FAULT_SINK_BYTES_PER_SEC` caps how fast a claim target accepts writes.
"""

from __future__ import annotations

import os
import time

from importer.formats.base import Buffer, RawTarget

ENV_SINK_RATE = "DVCR_FAULT_SINK_BYTES_PER_SEC"


def sink_rate_from_env() -> int | None:
    value = os.environ.get(ENV_SINK_RATE)
    return int(value) if value else None


class ThrottledTarget:
    """Wraps a target; each write sleeps so the average rate stays at `rate` (zeroing and
    flushing pass through as they are)."""

    def __init__(self, target: RawTarget, rate: int) -> None:
        self._target = target
        self._rate = rate
        self._started = time.monotonic()
        self._bytes = 0

    def declare_size(self, virtual_size: int) -> None:
        self._target.declare_size(virtual_size)

    def write(self, offset: int, data: Buffer) -> None:
        self._target.write(offset, data)
        self._bytes += len(data)
        ahead = self._bytes / self._rate - (time.monotonic() - self._started)
        if ahead > 0:
            time.sleep(ahead)

    def zero(self, offset: int, length: int) -> None:
        self._target.zero(offset, length)

    def flush(self) -> None:
        self._target.flush()


def throttled_from_env(target: RawTarget) -> RawTarget:
    """`target`, slowed to `DVCR_FAULT_SINK_BYTES_PER_SEC` when that is set."""
    rate = sink_rate_from_env()
    return ThrottledTarget(target, rate) if rate else target
