"""A deliberately slow target, for tests and benchmarks of backpressure.

Fault injection, not a feature: a real slow disk cannot be arranged on a test machine,
so `DVCR_FAULT_SINK_BYTES_PER_SEC` caps how fast a claim target accepts writes.
"""

from __future__ import annotations

import os
import time
from typing import Any

from importer.formats.base import Buffer

ENV_SINK_RATE = "DVCR_FAULT_SINK_BYTES_PER_SEC"


def sink_rate_from_env() -> int | None:
    value = os.environ.get(ENV_SINK_RATE)
    return int(value) if value else None


class ThrottledTarget:
    """Wraps a claim target; each write sleeps so the average rate stays at `rate`."""

    def __init__(self, target: Any, rate: int) -> None:
        self._target = target
        self._rate = rate
        self._started = time.monotonic()
        self._bytes = 0

    def write(self, offset: int, data: Buffer) -> None:
        self._target.write(offset, data)
        self._bytes += len(data)
        ahead = self._bytes / self._rate - (time.monotonic() - self._started)
        if ahead > 0:
            time.sleep(ahead)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)
