"""A source ready to stream, and the opener that makes one for each attempt of a transfer.

Every kind of source (importer/sources/openers.py, the server's uploads and claim reads)
comes to a transfer (importer/transfer.py) as an `OpenedSource`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from importer.sources.reader import ByteStream


@dataclass
class OpenedSource:
    """A source, ready to stream: its bytes, their length when known, a file name if any."""

    stream: ByteStream
    length: int | None
    filename: str | None = None
    offset: int = 0  # where `stream` starts in the image (a transfer that resumes)


# Opened again when a transfer starts over; the context's end closes what it holds.
SourceOpener = Callable[[], AbstractAsyncContextManager[OpenedSource]]
