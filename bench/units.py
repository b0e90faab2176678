"""Sizes and rates as people type and read them."""

from __future__ import annotations

import re

MiB = 1 << 20
MB = 1_000_000

_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """`2GiB`, `512Mi`, `16MiB`, `1000000`, `1.5GB` -> bytes."""
    match = _SIZE.match(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size like 2GiB, 512MiB or 1GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    for suffix, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{suffix}"
    for suffix, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f}{suffix}"
    return f"{n}B"


def mb_per_s(n_bytes: int, seconds: float) -> float:
    """Throughput in MB/s (10^6 bytes per second)."""
    return n_bytes / seconds / MB if seconds > 0 else float("inf")
