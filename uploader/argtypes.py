"""Types of command-line values: each checks its text when the flags are parsed, so a
mistake is a one-line usage error before anything starts."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from uploader.server.config import split_host_port

_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """`1073741824`, `512Mi`, `10Gi`, `1T`."""
    value = text.strip().removesuffix("i").removesuffix("B")
    suffix = value[-1:].upper() if value[-1:].isalpha() else ""
    number = value[: len(value) - len(suffix)]
    if suffix not in _SIZE_SUFFIXES or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512Mi or 2Ti")
    return int(number) * _SIZE_SUFFIXES[suffix]


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `24h`, `7d`; `0` means never."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _DURATION_UNITS else "s"
    number = value.removesuffix(unit) if value[-1:] in _DURATION_UNITS else value
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m or 24h")
    return seconds


def parse_bool(text: str) -> bool:
    """`true` or `false`, as kubectl's boolean flags (`--wait=false`)."""
    value = text.strip().lower()
    if value in ("true", "t", "1"):
        return True
    if value in ("false", "f", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def host_port(text: str) -> str:
    """`HOST:PORT`, `:PORT` or `[v6]:PORT`, kept as written."""
    try:
        _, port = split_host_port(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, like 0.0.0.0:8444")
    return text


def cidr(text: str) -> str:
    """An address range (`10.0.0.0/8`, `fd00::/8`) or one address, as its network."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an address range like 10.0.0.0/8"
        ) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def existing_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path
