"""The disk file of an image, read out of its layers as a stream.

A containerDisk (and a DVCR image) holds its disk as the one regular file under `disk/`
(`./disk/` and `/disk/` too). The layers are searched from the top one down; the first
layer with such a file is the one used, and it may hold only that one.

Each layer is read once, front to back, and never kept: not in memory, not on disk. Its
bytes are hashed as they pass and checked against the descriptor (size, then digest) when
the layer ends; the disk file's stream reads the rest of its layer after the file's last
byte, so a layer that does not match its digest fails the stream before it ends and a
consumer never commits what it received. Decompression (gzip, zstd; chosen by the media
type, or by the magic bytes) and the tar parsing run in worker threads, never on the event
loop; a worker pulls the blob's bytes from the loop as it needs them.

The tar is read by `importer.formats.tar`. Links, directories, devices and whiteouts
(`.wh.*`) are not the disk; a file stored sparse in the tar is refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import hashlib
import io
import threading
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import zstandard

from importer.errors import InvalidImage, SourceUnreachable
from importer.formats.tar import REGULAR, TarEntries, TarEntry
from importer.oci.image import Descriptor

PIECE = 1 << 20  # what one worker call hands back to the loop at most
GATHER = 256 << 10  # network bytes gathered per trip from the worker to the loop
LAYER_WORKERS = 32

NO_DISK = "the image has no file under disk/: it is not a containerDisk image"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DIGEST_HEX = {"sha256": 64, "sha512": 128}


@dataclass
class DiskFile:
    """The disk of an image: `chunks` yields exactly `size` bytes, then checks the rest of
    its layer; it raises (InvalidImage, SourceUnreachable) instead of ending when the layer
    is truncated or does not match its digest."""

    filename: str  # base name of the file under disk/
    size: int  # from the tar header
    chunks: AsyncIterator[bytes]


class LayerInterrupted(Exception):
    """The reader was closed while a worker waited for data."""


# --- where the blob's bytes come from ---------------------------------------------------


class RawSource(Protocol):
    def read(self, n: int) -> bytes:
        """Up to n bytes, b"" at the end; called from a worker thread."""
        ...

    def interrupt(self) -> None:
        """Makes a read blocked in a worker stop soon; called from the event loop."""
        ...

    async def aclose(self) -> None:
        """Releases the source, once no worker uses it."""
        ...


class FileSource:
    """A blob in a file (the OCI layout), read by the worker in pieces of PIECE bytes."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._file: io.FileIO | None = None
        self._interrupted = False

    def read(self, n: int) -> bytes:
        if self._interrupted:
            raise LayerInterrupted
        try:
            if self._file is None:
                self._file = io.FileIO(self.path, "r")
            return self._file.read(min(n, PIECE)) or b""
        except FileNotFoundError:
            raise SourceUnreachable(f"{self.what}: the blob {self.path.name} is missing") from None
        except OSError as exc:
            raise SourceUnreachable(f"{self.what}: reading {self.path}: {exc.strerror}") from None

    def interrupt(self) -> None:
        self._interrupted = True

    async def aclose(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class IteratorSource:
    """A blob arriving on the event loop as an async iterator (a registry download). The
    worker asks the loop for the next bytes and waits; the loop stays free meanwhile."""

    def __init__(self, chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._chunks = chunks
        self._loop = loop
        self._buffer = b""
        self._offset = 0
        self._ended = False
        self._interrupted = threading.Event()  # set on the loop, read by the worker
        self._pending: concurrent.futures.Future[bytes] | None = None
        self._gathering: asyncio.Task[bytes] | None = None

    def read(self, n: int) -> bytes:
        while self._offset >= len(self._buffer):
            if self._ended:
                return b""
            self._buffer = self._fetch()
            self._offset = 0
            if not self._buffer:
                self._ended = True
        start = self._offset
        self._offset = min(len(self._buffer), start + n)
        if start == 0 and self._offset == len(self._buffer):
            return self._buffer
        return self._buffer[start : self._offset]

    def _fetch(self) -> bytes:
        if self._interrupted.is_set():
            raise LayerInterrupted
        future = asyncio.run_coroutine_threadsafe(self._gather(), self._loop)
        self._pending = future
        if self._interrupted.is_set():
            future.cancel()
        try:
            while True:
                try:
                    return future.result(timeout=1.0)
                except concurrent.futures.TimeoutError:
                    if self._loop.is_closed() or not self._loop.is_running():
                        future.cancel()
                        raise LayerInterrupted from None
        except concurrent.futures.CancelledError:
            raise LayerInterrupted from None
        finally:
            self._pending = None

    async def _gather(self) -> bytes:
        self._gathering = asyncio.current_task()
        try:
            parts: list[bytes] = []
            size = 0
            while size < GATHER:
                try:
                    chunk = await anext(self._chunks)
                except StopAsyncIteration:
                    break
                if chunk:
                    parts.append(bytes(chunk))
                    size += len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            self._gathering = None

    def interrupt(self) -> None:
        self._interrupted.set()
        pending = self._pending
        if pending is not None:
            pending.cancel()

    async def aclose(self) -> None:
        gathering = self._gathering
        if gathering is not None and not gathering.done():
            gathering.cancel()
            await asyncio.wait({gathering})
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):  # still running: it ends on its own
                await aclose()


# --- the worker side: hashing, decompression, tar ----------------------------------------


class _Blob:
    """The layer's bytes as read: counted and hashed, checked against the descriptor."""

    def __init__(self, source: RawSource, layer: Descriptor) -> None:
        self.source = source
        self.layer = layer
        algorithm, _, expected = layer.digest.partition(":")
        if _DIGEST_HEX.get(algorithm) != len(expected):
            raise InvalidImage(f"the layer digest {layer.digest!r} is not supported")
        self._algorithm = algorithm
        self._expected = expected.lower()
        self._hash = hashlib.new(algorithm)
        self._peeked = b""
        self.count = 0
        self.checked = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = PIECE
        if self._peeked:
            data, self._peeked = self._peeked[:n], self._peeked[n:]
            return data
        return self._read_source(n)

    def _read_source(self, n: int) -> bytes:
        data = self.source.read(n) if n else b""
        if data:
            self._hash.update(data)
            self.count += len(data)
            if self.count > self.layer.size:
                raise InvalidImage(
                    f"the layer {self.layer.digest} is longer than the {self.layer.size} "
                    "bytes its descriptor gives"
                )
        elif n:
            self._check()
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, /) -> int:
        """Never: a layer is read once (a gzip reader asks for it only to go back)."""
        raise io.UnsupportedOperation("a layer is read once, front to back")

    def peek(self, n: int) -> bytes:
        """The first n bytes (fewer at the end), which read() then returns again."""
        while len(self._peeked) < n:
            more = self._read_source(n - len(self._peeked))
            if not more:
                break
            self._peeked += more
        return self._peeked[:n]

    def drain(self) -> None:
        """Reads the rest (a compressed stream may go on after the tar's end) and checks."""
        self._peeked = b""
        while self.read(PIECE):
            pass

    def _check(self) -> None:
        if self.checked:
            return
        if self.count != self.layer.size:
            raise InvalidImage(
                f"the layer {self.layer.digest} ended after {self.count} of the "
                f"{self.layer.size} bytes its descriptor gives"
            )
        actual = self._hash.hexdigest()
        if actual != self._expected:
            raise InvalidImage(
                f"the layer {self.layer.digest} does not match its digest: its bytes hash "
                f"to {self._algorithm}:{actual}"
            )
        self.checked = True


def _compression(blob: _Blob) -> str:
    """gzip, zstd or tar: by the magic bytes, else by the media type."""
    head = blob.peek(4)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    media_type = blob.layer.media_type
    if media_type.endswith(("+gzip", ".tar.gzip", ".tar.gz")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    return "tar"


class _Decompressed:
    """The layer's tar stream, decompressed when needed; decoder errors as InvalidImage."""

    def __init__(self, blob: _Blob) -> None:
        self.blob = blob
        self.kind = _compression(blob)
        self._reader: Callable[[int], bytes]
        if self.kind == "gzip":
            self._reader = gzip.GzipFile(fileobj=blob, mode="rb").read
        elif self.kind == "zstd":
            # zstandard's stubs ask for a whole IO[bytes]; the reader only calls read().
            stream = zstandard.ZstdDecompressor().stream_reader(
                blob,  # type: ignore[arg-type]
                read_size=GATHER,
                read_across_frames=True,
                closefd=False,
            )
            self._reader = stream.read
        else:
            self._reader = blob.read

    def read(self, n: int) -> bytes:
        try:
            return self._reader(n)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise InvalidImage(
                f"the layer {self.blob.layer.digest} is not a valid {self.kind} stream: {exc}"
            ) from None


def _disk_parts(entry: TarEntry) -> list[str] | None:
    """The path's parts when it is under disk/ (`./disk/`, `/disk/`), else None."""
    parts = [part for part in entry.name.split("/") if part not in ("", ".")]
    if len(parts) < 2 or parts[0] != "disk" or ".." in parts:
        return None
    return parts


def _is_disk_candidate(entry: TarEntry) -> bool:
    parts = _disk_parts(entry)
    return (
        parts is not None
        and not parts[-1].startswith(".wh.")
        and (entry.type in REGULAR or entry.sparse)
    )


class _LayerWork:
    """What a worker does with one layer (never two workers at once)."""

    def __init__(self, source: RawSource, layer: Descriptor) -> None:
        self.layer = layer
        self.what = f"the layer {layer.digest}"
        self.blob = _Blob(source, layer)
        self.tar: TarEntries | None = None
        self.disk: TarEntry | None = None

    def find_disk(self) -> TarEntry | None:
        self.tar = TarEntries(_Decompressed(self.blob).read, self.what)
        while (entry := self.tar.next()) is not None:
            if _is_disk_candidate(entry):
                self._refuse_sparse(entry)
                self.disk = entry
                return entry
        self.blob.drain()
        return None

    def read_disk(self, n: int) -> bytes | None:
        """The next piece of the disk file; None after its end, once the rest of the layer
        has been read and the layer checked."""
        assert self.tar is not None and self.disk is not None
        if self.tar.remaining:
            return self.tar.read_data(n)
        while (entry := self.tar.next()) is not None:
            if _is_disk_candidate(entry):
                raise InvalidImage(
                    f"{self.what} has more than one file under disk/: {self.disk.name} "
                    f"and {entry.name}"
                )
        self.blob.drain()
        return None

    def _refuse_sparse(self, entry: TarEntry) -> None:
        if entry.sparse:
            raise InvalidImage(
                f"{self.what}: {entry.name} is stored as a sparse file in the tar, which is "
                "not supported"
            )


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _workers() -> concurrent.futures.ThreadPoolExecutor:
    """Threads of their own: a worker waits for the loop, so it must not hold a thread of
    the loop's default executor (which the loop may need, e.g. to resolve a name)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                LAYER_WORKERS, thread_name_prefix="layer-reader"
            )
        return _executor


class LayerReader:
    """One layer, read on the loop's behalf by worker threads."""

    def __init__(self, layer: Descriptor, source: RawSource) -> None:
        self.layer = layer
        self._source = source
        self._work = _LayerWork(source, layer)
        self._job: concurrent.futures.Future[object] | None = None

    async def _run(self, function: Callable[..., object], *args: object) -> object:
        self._job = _workers().submit(function, *args)
        return await asyncio.wrap_future(self._job)

    async def find_disk(self) -> TarEntry | None:
        """The disk file's entry, positioned at its data; None (after reading and checking
        the whole layer) when the layer has none."""
        return await self._run(self._work.find_disk)  # type: ignore[return-value]

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        while (piece := await self._run(self._work.read_disk, PIECE)) is not None:
            yield piece  # type: ignore[misc]

    async def close(self) -> None:
        self._source.interrupt()
        job = self._job
        if job is not None and not job.done():
            waiter = asyncio.wrap_future(job)
            await asyncio.wait({waiter})
            if not waiter.cancelled():
                waiter.exception()  # LayerInterrupted, most likely: nobody wants it now
        await self._source.aclose()


@asynccontextmanager
async def disk_from_layers(
    layers: Sequence[Descriptor], open_blob: Callable[[Descriptor], RawSource]
) -> AsyncIterator[DiskFile]:
    """The disk file of the image with these layers (bottom first, as in a manifest)."""
    for layer in reversed(layers):
        reader = LayerReader(layer, open_blob(layer))
        try:
            entry = await reader.find_disk()
            if entry is None:
                continue
            parts = _disk_parts(entry)
            assert parts is not None
            chunks = reader.chunks()
            try:
                yield DiskFile(filename=parts[-1], size=entry.size, chunks=chunks)
            finally:
                await chunks.aclose()
            return
        finally:
            await reader.close()
    raise InvalidImage(NO_DISK)
