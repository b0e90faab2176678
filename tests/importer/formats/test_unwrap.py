"""Unwrapping gzip, xz, zstd, bzip2 and tar on the stream; compression bombs."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import subprocess
import tarfile
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard
from feeding import random_pieces
from hypothesis import given, settings
from hypothesis import strategies as st
from qcow2_helpers import MiB

from importer.errors import ImageTooLarge, InvalidImage, TransferError
from importer.formats.base import Limits
from importer.formats.tar import parse_pax_records, parse_tar_number
from importer.formats.unwrap import (
    BYTES_PER_UNIT,
    FREE_UNITS,
    PIECE,
    TarReader,
    unwrapper,
    zstd_decompress_exactly,
)


class Collect:
    """The stage after an unwrapper: keeps what arrives and the largest piece."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.largest = 0
        self.finished = False
        self.closed = False

    def feed(self, data: memoryview) -> None:
        self.largest = max(self.largest, len(data))
        self.data += data

    def finish(self) -> None:
        self.finished = True

    def settle(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def unwrap(kind: str, data: bytes, seed: int = 0, limits: Limits | None = None) -> Collect:
    out = Collect()
    stage = unwrapper(kind, out, limits or Limits())
    for piece in random_pieces(data, random.Random(seed), big=1 * MiB):
        stage.feed(piece)
    stage.finish()
    assert out.finished
    return out


@pytest.fixture(scope="module")
def payload() -> bytes:
    """Compressible and incompressible stretches, a few MiB."""
    rnd = random.Random(9)
    parts = []
    for _ in range(40):
        parts.append(rnd.randbytes(rnd.randint(1, 60_000)))
        parts.append(bytes(rnd.randint(1, 200_000)))
        parts.append(b"abc" * rnd.randint(1, 20_000))
    return b"".join(parts)


def _zstd_frames(data: bytes) -> bytes:
    """Frames of every kind: content size, none (streamed), checksum, skippable, empty."""
    third = len(data) // 3
    streamed = zstandard.ZstdCompressor(write_checksum=True).compressobj()
    return (
        zstandard.ZstdCompressor(level=3).compress(data[:third])
        + b"\x5a\x2a\x4d\x18\x05\x00\x00\x00hello"
        + streamed.compress(data[third : 2 * third])
        + streamed.flush()
        + zstandard.ZstdCompressor(write_content_size=False).compress(b"")
        + zstandard.ZstdCompressor(level=1).compress(data[2 * third :])
    )


def _halves(compress: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """Two members / streams, one after the other."""
    return lambda data: compress(data[: len(data) // 2]) + compress(data[len(data) // 2 :])


FORMATS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "gzip": ("gzip", gzip.compress),
    "gzip-members": ("gzip", _halves(gzip.compress)),
    "gzip-padded": ("gzip", lambda d: gzip.compress(d) + bytes(1000)),
    "xz": ("xz", lzma.compress),
    "xz-streams-padded": ("xz", lambda d: _halves(lzma.compress)(d) + bytes(8)),
    "zstd": ("zstd", zstandard.ZstdCompressor().compress),
    "zstd-frames": ("zstd", _zstd_frames),
    "bzip2": ("bzip2", bz2.compress),
    "bzip2-streams": ("bzip2", _halves(bz2.compress)),
}


@pytest.mark.parametrize(("kind", "compress"), FORMATS.values(), ids=list(FORMATS))
def test_round_trip(kind: str, compress: Callable[[bytes], bytes], payload: bytes) -> None:
    wrapped = compress(payload)
    out = unwrap(kind, wrapped, seed=len(wrapped))
    assert bytes(out.data) == payload
    assert out.largest <= PIECE


@pytest.mark.parametrize(("kind", "compress"), FORMATS.values(), ids=list(FORMATS))
def test_truncated(kind: str, compress: Callable[[bytes], bytes], payload: bytes) -> None:
    wrapped = compress(payload[:300_000])
    # Cut inside the (first) member, well before any padding.
    with pytest.raises(InvalidImage, match=f"{kind}: .*(truncated|corrupt)"):
        unwrap(kind, wrapped[: len(compress(payload[:150_000])) // 2])


@pytest.mark.parametrize(("kind", "compress"), FORMATS.values(), ids=list(FORMATS))
def test_garbage_after_the_end(
    kind: str, compress: Callable[[bytes], bytes], payload: bytes
) -> None:
    with pytest.raises(InvalidImage, match=kind):
        unwrap(kind, compress(payload[:10_000]) + b"\x00\x00garbage")


@pytest.mark.parametrize(
    ("kind", "compress"),
    [
        ("gzip", gzip.compress),
        ("xz", lzma.compress),
        # As the zstd tool writes them: with a checksum, without which a flipped byte in
        # a stored block goes unnoticed.
        ("zstd", zstandard.ZstdCompressor(write_checksum=True).compress),
        ("bzip2", bz2.compress),
    ],
)
def test_corrupt(kind: str, compress: Callable[[bytes], bytes], payload: bytes) -> None:
    wrapped = bytearray(compress(payload[:500_000]))
    for i in range(len(wrapped) // 3, len(wrapped) // 3 + 64):
        wrapped[i] ^= 0x5A
    with pytest.raises(InvalidImage, match=kind):
        unwrap(kind, bytes(wrapped))


def _zstd_bomb(size: int) -> bytes:
    writer = zstandard.ZstdCompressor(level=19).compressobj()
    chunk = bytes(4 * MiB)
    return b"".join(writer.compress(chunk) for _ in range(size // len(chunk))) + writer.flush()


def _gzip_bomb(size: int) -> bytes:
    writer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(4 * MiB)
    return b"".join(writer.compress(chunk) for _ in range(size // len(chunk))) + writer.flush()


def _xz_bomb(size: int) -> bytes:
    writer = lzma.LZMACompressor(preset=1)
    chunk = bytes(4 * MiB)
    return b"".join(writer.compress(chunk) for _ in range(size // len(chunk))) + writer.flush()


def _bzip2_bomb(size: int) -> bytes:
    writer = bz2.BZ2Compressor(9)
    chunk = bytes(4 * MiB)
    return b"".join(writer.compress(chunk) for _ in range(size // len(chunk))) + writer.flush()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """128 MiB of zeros in one member, a few bytes to 128 KiB packed, then the same
    member seven times more: 1 GiB in all."""
    size = 128 * MiB
    return {
        "gzip": _gzip_bomb(size) * 8,
        "xz": _xz_bomb(size) * 8,
        "zstd": _zstd_bomb(size) * 8,
        "bzip2": _bzip2_bomb(size) * 8,
    }


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "bzip2"])
def test_compression_bomb(kind: str, bombs: dict[str, bytes]) -> None:
    """Stopped once past the limit (16 MiB + allowance), fast, in bounded memory."""
    counter = _Counter()
    stage = unwrapper(kind, counter, Limits(max_virtual_size=16 * MiB))
    bomb = bombs[kind]
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ImageTooLarge, match="expands to more than"):
            for pos in range(0, len(bomb), 4 * MiB):
                stage.feed(memoryview(bomb)[pos : pos + 4 * MiB])
            stage.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 10
    assert peak < 16 * MiB
    assert counter.largest <= PIECE
    assert 16 * MiB < counter.received <= 16 * MiB + 2 * MiB + 64 * MiB


class _Counter(Collect):
    """Counts what arrives without keeping it."""

    received = 0

    def feed(self, data: memoryview) -> None:
        self.largest = max(self.largest, len(data))
        self.received += len(data)


# -- streams of tiny units (frames, members, streams, blocks) ------------------------------

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _tiny_units() -> dict[str, tuple[str, bytes]]:
    """4 MiB of units that each carry next to nothing: the cost is all per unit."""
    one = b"x"
    return {
        "zstd-frames": ("zstd", zstandard.ZstdCompressor(write_content_size=False).compress(one)),
        # One frame (128 MiB window) of empty raw blocks, then its last block.
        "zstd-blocks": ("zstd", _ZSTD_MAGIC + b"\x00\x88" + b"\x00\x00\x00" * 1_400_000),
        "zstd-skippable": ("zstd", b"\x50\x2a\x4d\x18\x00\x00\x00\x00"),
        "gzip-members": ("gzip", gzip.compress(one, mtime=0)),
        "bzip2-streams": ("bzip2", bz2.compress(one)),
        "xz-streams": ("xz", lzma.compress(one)),
        "xz-empty-streams": ("xz", lzma.compress(b"")),  # header, empty index, footer
    }


def _repeat_to(unit: bytes, size: int) -> bytes:
    return unit * (size // len(unit)) if len(unit) < size else unit


@pytest.mark.parametrize("name", list(_tiny_units()))
def test_a_stream_of_tiny_units_is_refused_early(name: str) -> None:
    """Refused at the first unit past the bound, long before the 4 MiB are through."""
    kind, unit = _tiny_units()[name]
    data = _repeat_to(unit, 4 * MiB)
    if name == "zstd-skippable":
        data = zstandard.ZstdCompressor().compress(b"disk") + data
    counter = _Counter()
    stage = unwrapper(kind, counter, Limits())
    fed = 0
    with pytest.raises(InvalidImage, match=f"{kind}: .* no compressor makes units that small"):
        for pos in range(0, len(data), 256 * 1024):
            stage.feed(memoryview(data)[pos : pos + 256 * 1024])
            fed += 1
        stage.finish()
    assert fed <= 1  # refused within the first 512 KiB
    assert stage.units <= FREE_UNITS + 2 * (512 * 1024) // BYTES_PER_UNIT  # type: ignore[attr-defined]


def test_many_small_pieces_go_on_gathered() -> None:
    """Members of 4 KiB each arrive downstream in few large pieces, not one per member."""
    rnd = random.Random(3)
    members = [rnd.randbytes(4096) for _ in range(200)]
    counter = _Counter()
    calls = 0
    original = counter.feed

    def counting(data: memoryview) -> None:
        nonlocal calls
        calls += 1
        original(data)

    counter.feed = counting  # type: ignore[method-assign]
    stage = unwrapper("gzip", counter, Limits())
    stage.feed(memoryview(b"".join(gzip.compress(m, mtime=0) for m in members)))
    stage.finish()
    assert counter.received == 200 * 4096
    assert calls <= 4


# -- what real compressors make stays far below the bound ------------------------------------


@pytest.fixture(scope="module")
def sparse_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 MiB, mostly zeros with some data: the units of sparse images are the smallest."""
    path = tmp_path_factory.mktemp("tools") / "disk.img"
    rnd = random.Random(5)
    with path.open("wb") as f:
        for i in range(64):
            f.write(rnd.randbytes(64 * 1024) + bytes(960 * 1024) if i % 16 == 0 else bytes(MiB))
    return path


def _tool(*argv: str) -> Callable[[Path], bytes]:
    return lambda path: subprocess.run([*argv, str(path)], check=True, capture_output=True).stdout


def _in_chunks(compress: Callable[[bytes], bytes], chunk: int) -> Callable[[Path], bytes]:
    """One member or stream per `chunk` of input, as bgzip (65280 bytes per BGZF block) and
    pbzip2 (900 kB per stream) write them."""
    return lambda path: b"".join(compress(block) for block in _chunks(path.read_bytes(), chunk))


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for pos in range(0, len(data), size):
        yield data[pos : pos + size]


REAL_COMPRESSORS: dict[str, tuple[str, Callable[[Path], bytes]]] = {
    "zstd -T0": ("zstd", _tool("zstd", "-q", "-T0", "-c")),
    "pzstd": ("zstd", _tool("pzstd", "-q", "-c")),
    "xz -T0": ("xz", _tool("xz", "-T0", "-c")),
    "xz -T0 -0": ("xz", _tool("xz", "-T0", "-0", "-c")),
    "gzip": ("gzip", _tool("gzip", "-c")),
    "bzip2": ("bzip2", _tool("bzip2", "-c")),
    "bgzip layout": ("gzip", _in_chunks(lambda b: gzip.compress(b, mtime=0), 65280)),
    "pbzip2 layout": ("bzip2", _in_chunks(bz2.compress, 900_000)),
}


@pytest.mark.parametrize("tool", list(REAL_COMPRESSORS))
def test_real_compressors_stay_far_below_the_unit_bound(tool: str, sparse_disk: Path) -> None:
    kind, compress = REAL_COMPRESSORS[tool]
    data = compress(sparse_disk)
    counter = _Counter()
    stage = unwrapper(kind, counter, Limits())
    for pos in range(0, len(data), 2 * MiB):
        stage.feed(memoryview(data)[pos : pos + 2 * MiB])
    stage.finish()
    assert counter.received == sparse_disk.stat().st_size
    bytes_per_unit = (stage.consumed + stage.produced) / stage.units  # type: ignore[attr-defined]
    assert bytes_per_unit >= 8 * BYTES_PER_UNIT


def test_zstd_decompress_exactly() -> None:
    data = random.Random(1).randbytes(70_000)
    frame = zstandard.ZstdCompressor().compress(data)
    assert zstd_decompress_exactly(frame + b"sector padding", 70_000) == data
    assert zstd_decompress_exactly(frame, 50_000) == data[:50_000]
    assert zstd_decompress_exactly(frame, 80_000) is None
    assert zstd_decompress_exactly(frame[:-100], 70_000) is None
    assert zstd_decompress_exactly(b"garbage", 10) is None
    # A frame that would expand enormously is decoded no further than asked.
    assert zstd_decompress_exactly(_zstd_bomb(64 * MiB), 65536) == bytes(65536)


# -- tar ----------------------------------------------------------------------------------------


def _tar(
    members: list[tuple[str, bytes | None]], fmt: int = tarfile.GNU_FORMAT, end: bool = True
) -> bytes:
    """Regular files (bytes), directories (None)."""
    out = io.BytesIO()
    archive = tarfile.open(fileobj=out, mode="w", format=fmt)  # noqa: SIM115
    for name, content in members:
        info = tarfile.TarInfo(name)
        if content is None:
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        else:
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    if end:
        archive.close()
    return out.getvalue()


LONG = "very-long-directory-name-" * 8 + "/disk-with-a-long-name.qcow2"


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=str
)
@pytest.mark.parametrize("name", ["disk.img", LONG], ids=["short", "long"])
def test_tar_one_file(fmt: int, name: str, payload: bytes) -> None:
    if fmt == tarfile.USTAR_FORMAT and name == LONG:
        name = "very-long-directory-name/" * 6 + "disk.img"  # fits the ustar prefix
    content = payload[:1_234_567]
    archive = _tar([("disk", None), (name, content)], fmt)
    out = unwrap("tar", archive, seed=len(name))
    assert bytes(out.data) == content


def test_tar_pax_headers_are_parsed() -> None:
    records = parse_pax_records(b"30 mtime=1700000000.123456789\n13 size=4096\n")
    assert records == {"mtime": "1700000000.123456789", "size": "4096"}
    with pytest.raises(InvalidImage, match="pax"):
        parse_pax_records(b"99 size=1\n")


def test_tar_numbers() -> None:
    assert parse_tar_number(b"00000001750\x00") == 0o1750
    assert parse_tar_number(b"     1750 \x00") == 0o1750
    assert parse_tar_number(b"\x80" + (10 << 30).to_bytes(11, "big")) == 10 << 30
    assert parse_tar_number(b"\xff" * 12) == -1
    assert parse_tar_number(b"12x4\x00") == -1


def test_tar_without_end_marker(payload: bytes) -> None:
    archive = _tar([("disk.img", payload[:5000])], end=False)
    assert bytes(unwrap("tar", archive).data) == payload[:5000]


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (lambda: _tar([("a.img", b"a" * 600), ("b.img", b"b")]), "more than one file"),
        (lambda: _tar([("a.img", b""), ("b.img", b"b")]), "more than one file"),
        (lambda: _tar([("dir", None)]), "no file"),
        (lambda: _tar([("a.img", b"a" * 700)])[:900], "truncated"),
        (lambda: _tar([("a.img", b"a" * 700)])[:300], "truncated"),
        (lambda: _symlink_tar(), "symbolic link"),
        (lambda: _bad_checksum_tar(), "checksum"),
    ],
    ids=[
        "two-files",
        "empty-and-one",
        "no-file",
        "cut-in-content",
        "cut-in-header",
        "symlink",
        "bad-checksum",
    ],
)
def test_tar_refused(archive: Callable[[], bytes], message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        unwrap("tar", archive())


def _symlink_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        info = tarfile.TarInfo("disk.img")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    return out.getvalue()


def _bad_checksum_tar() -> bytes:
    data = bytearray(_tar([("a.img", b"a")]))
    data[0] ^= 1
    return bytes(data)


def test_tar_file_larger_than_any_image() -> None:
    header = bytearray(_tar([("a.img", b"")])[:512])
    header[124:136] = b"\x80" + (1 << 50).to_bytes(11, "big")
    header[148:156] = b"        "
    header[148:156] = f"{sum(header):06o}\x00 ".encode()
    stage = TarReader(Collect(), Limits(max_virtual_size=1 << 30))
    with pytest.raises(ImageTooLarge, match=r"a\.img"):
        stage.feed(memoryview(bytes(header)))


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["gzip", "xz", "zstd", "bzip2", "tar"]),
    flips=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 5000)),
    seed=st.integers(0, 1 << 30),
)
def test_fuzz(kind: str, flips: list[tuple[int, int]], cut: int | None, seed: int) -> None:
    content = random.Random(seed).randbytes(2000) + bytes(3000)
    wrapped = bytearray(
        {
            "gzip": gzip.compress,
            "xz": lzma.compress,
            "zstd": zstandard.ZstdCompressor().compress,
            "bzip2": bz2.compress,
            "tar": lambda d: _tar([("disk", None), ("disk/x.img", d)]),
        }[kind](content)
    )
    for position, value in flips:
        wrapped[position % len(wrapped)] = value
    if cut is not None:
        del wrapped[cut:]
    try:
        out = unwrap(kind, bytes(wrapped), seed, Limits(max_virtual_size=1 * MiB))
    except TransferError:
        return
    assert len(out.data) <= 1 * MiB + (1 * MiB >> 3) + 64 * MiB
    if not flips and cut is None:
        assert bytes(out.data) == content
