"""A line about the machine a table was measured on."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

from bench.workdir import mount_of


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def disk_of(path: Path) -> str:
    """Device, filesystem and, when the kernel tells, the model and rotational flag."""
    mount = mount_of(path)
    text = f"{mount.device} ({mount.fstype} on {mount.point})"
    name = Path(mount.device).name
    block = Path("/sys/class/block") / name
    if block.exists():
        disk = block.resolve()
        if (disk / "partition").exists():
            disk = disk.parent
        model = _read(disk / "device" / "model")
        sectors = _read(disk / "size")
        size = f"{int(sectors) * 512 / (1 << 30):.0f} GiB disk {disk.name}" if sectors else ""
        extra = ", ".join(x for x in (size, model) if x)
        if extra:
            text += f", {extra}"
    return text


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def meminfo_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


def describe(workdir: Path) -> dict[str, str]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "memory": f"{meminfo_total_gib():.0f} GiB",
        "disk": disk_of(workdir),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
