"""Transfer progress: bytes done, percentage, average and current speed."""

from __future__ import annotations

import time
from collections import deque

_WINDOW = 3.0  # seconds over which the current speed is measured


def format_quantity(value: float) -> str:
    """Binary-suffixed quantity in Kubernetes style: 95.4Mi, 1.2Gi, 10Gi, 512."""
    for suffix, factor in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if value >= factor:
            scaled = value / factor
            text = f"{scaled:.1f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return str(int(value))


class Progress:
    """Counts bytes as they are received. Called from the event loop only."""

    def __init__(self, total: int | None = None, done: int = 0) -> None:
        self.restart(total, done)

    def restart(self, total: int | None, done: int = 0) -> None:
        """Counting from `done` again, for a transfer that starts over or resumes."""
        self.total = total
        self.done = done
        self.started = time.monotonic()
        self._start_done = done
        self._samples: deque[tuple[float, int]] = deque([(self.started, done)])

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._samples[-1][0] >= 0.1:
            self._samples.append((now, self.done))
            while len(self._samples) > 2 and now - self._samples[0][0] > _WINDOW:
                self._samples.popleft()

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.done / self.total)

    def percent(self) -> str:
        fraction = self.fraction
        return "" if fraction is None else f"{fraction * 100:.1f}%"

    def average_speed(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def current_speed(self) -> float:
        now = time.monotonic()
        t0, d0 = self._samples[0]
        if now - t0 <= 0:
            return 0.0
        return (self.done - d0) / (now - t0)

    def speed_status(self) -> dict[str, str]:
        avg, cur = self.average_speed(), self.current_speed()
        return {
            "avg": f"{format_quantity(avg)}/s",
            "avgBytes": str(int(avg)),
            "current": f"{format_quantity(cur)}/s",
            "currentBytes": str(int(cur)),
        }
