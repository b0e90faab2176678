"""Resumable hashers: saved and restored anywhere in the stream, they match hashlib."""

from __future__ import annotations

import array
import hashlib
import itertools
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from importer import hashstate
from importer.checksums import ChecksumLane
from importer.hashstate import HashStateUnavailable, ResumableHash

REPO = Path(__file__).resolve().parents[2]
ALGORITHMS = hashstate.ALGORITHMS
STATE_SIZE = {"sha256": 12 + 112, "md5": 12 + 92}

pytestmark = pytest.mark.skipif(not hashstate.AVAILABLE, reason=str(hashstate.UNAVAILABLE_REASON))


def as_kind(data: bytes, kind: str) -> bytes | bytearray | memoryview:
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "rw-view":
        return memoryview(bytearray(b"xx" + data + b"yy"))[2 : 2 + len(data)]
    return memoryview(b"xx" + data + b"yy")[2 : 2 + len(data)]  # read-only slice of bytes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=8),
    kinds=st.lists(st.sampled_from(["bytes", "bytearray", "rw-view", "ro-view"]), min_size=9),
)
def test_save_and_restore_at_every_split_matches_hashlib(
    algorithm: str, data: bytes, cuts: list[int], kinds: list[str]
) -> None:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    hasher = ResumableHash(algorithm)
    for i, (start, end) in enumerate(itertools.pairwise(points)):
        hasher.update(as_kind(data[start:end], kinds[i]))
        assert hasher.bytes_hashed == end
        saved = hasher.state()
        assert isinstance(saved, bytes) and len(saved) == STATE_SIZE[algorithm]
        hasher = ResumableHash.from_state(algorithm, saved)
        assert hasher.bytes_hashed == end
        assert hasher.state() == saved
    assert hasher.hexdigest() == hashlib.new(algorithm, data).hexdigest()
    assert hasher.digest() == hashlib.new(algorithm, data).digest()


CHILD = """
import sys
from importer.hashstate import ResumableHash
algorithm, state, more = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
hasher = ResumableHash.from_state(algorithm, state)
hasher.update(more)
print(hasher.state().hex())
"""


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_state_survives_a_new_process(algorithm: str) -> None:
    data = os.urandom(5000)
    first = ResumableHash(algorithm)
    first.update(data[:1234])
    child = subprocess.run(
        [sys.executable, "-c", CHILD, algorithm, first.state().hex(), data[1234:4321].hex()],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    last = ResumableHash.from_state(algorithm, bytes.fromhex(child.stdout.strip()))
    assert last.bytes_hashed == 4321
    last.update(data[4321:])
    assert last.hexdigest() == hashlib.new(algorithm, data).hexdigest()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_empty_input(algorithm: str) -> None:
    hasher = ResumableHash(algorithm)
    hasher.update(b"")
    hasher.update(bytearray())
    hasher.update(memoryview(b""))
    assert hasher.bytes_hashed == 0
    assert hasher.hexdigest() == hashlib.new(algorithm).hexdigest()
    restored = ResumableHash.from_state(algorithm, ResumableHash(algorithm).state())
    assert restored.hexdigest() == hashlib.new(algorithm).hexdigest()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hexdigest_mid_stream_does_not_change_the_final_digest(algorithm: str) -> None:
    data = os.urandom(10_000)
    hasher = ResumableHash(algorithm)
    for i in range(0, len(data), 333):
        hasher.update(data[i : i + 333])
        assert hasher.hexdigest() == hashlib.new(algorithm, data[: i + 333]).hexdigest()
        assert hasher.hexdigest() == hasher.hexdigest()
    assert hasher.hexdigest() == hashlib.new(algorithm, data).hexdigest()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_copy_is_independent(algorithm: str) -> None:
    hasher = ResumableHash(algorithm)
    hasher.update(b"common ")
    clone = hasher.copy()
    hasher.update(b"one")
    clone.update(b"other")
    assert hasher.hexdigest() == hashlib.new(algorithm, b"common one").hexdigest()
    assert clone.hexdigest() == hashlib.new(algorithm, b"common other").hexdigest()
    assert clone.bytes_hashed == len(b"common other")


def test_buffer_kinds() -> None:
    data = os.urandom(4096)
    want = hashlib.sha256(data).hexdigest()
    for buf in (
        data,
        bytearray(data),
        memoryview(data),
        memoryview(bytearray(data)),
        array.array("I", data),
        memoryview(data).cast("I"),
    ):
        hasher = ResumableHash("sha256")
        hasher.update(buf)
        assert hasher.hexdigest() == want, type(buf)
        assert hasher.bytes_hashed == len(data)
    for strided in (memoryview(data)[::2], memoryview(bytearray(data))[::2]):
        with pytest.raises(BufferError):
            ResumableHash("sha256").update(strided)


def test_state_format_is_stable() -> None:
    """Version 1: b"hs", version, tag, bytes hashed, then the context in little-endian."""
    hasher = ResumableHash("sha256")
    hasher.update(b"abc")
    state = hasher.state()
    initial = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A)
    initial += (0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
    assert state[:12] == b"hs\x01\x01" + struct.pack("<Q", 3)
    assert state[12:44] == struct.pack("<8I", *initial)  # no full block hashed yet
    assert state[44:52] == struct.pack("<2I", 24, 0)  # bit count
    assert state[52:55] == b"abc"
    assert state[116:] == struct.pack("<2I", 3, 32)  # partial block length, digest length
    md5 = ResumableHash("md5").state()
    assert md5[:12] == b"hs\x01\x02" + bytes(8)
    assert md5[12:28] == struct.pack("<4I", 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)


def corrupt(state: bytes, offset: int, value: bytes) -> bytes:
    return state[:offset] + value + state[offset + len(value) :]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_corrupt_or_short_state_is_refused(algorithm: str) -> None:
    hasher = ResumableHash(algorithm)
    hasher.update(os.urandom(1000))
    good = hasher.state()
    counters = 12 + (32 if algorithm == "sha256" else 16)
    bad = [
        b"",
        good[:-1],
        good + b"\x00",
        good[:12],
        corrupt(good, 0, b"xx"),  # magic
        corrupt(good, 2, b"\x02"),  # version
        corrupt(good, 3, b"\x09"),  # unknown algorithm
        corrupt(good, 4, struct.pack("<Q", 1001)),  # bytes hashed disagrees with the context
        corrupt(good, counters, struct.pack("<I", 1234)),  # bit count
        corrupt(good, counters + 72, struct.pack("<I", 64)),  # partial block length
        bytes(len(good)),
        os.urandom(len(good)),
    ]
    if algorithm == "sha256":
        bad.append(corrupt(good, 3, b"\x02"))  # says md5
        bad.append(corrupt(good, 120, struct.pack("<I", 28)))  # a SHA-224 context
    for state in bad:
        with pytest.raises(ValueError):
            ResumableHash.from_state(algorithm, state)
    other = "md5" if algorithm == "sha256" else "sha256"
    with pytest.raises(ValueError):
        ResumableHash.from_state(other, good)
    assert ResumableHash.from_state(algorithm, good).hexdigest() == hasher.hexdigest()


@settings(max_examples=200, deadline=None)
@given(algorithm=st.sampled_from(ALGORITHMS), garbage=st.binary(min_size=0, max_size=200))
def test_garbage_state_is_refused(algorithm: str, garbage: bytes) -> None:
    with pytest.raises(ValueError):
        ResumableHash.from_state(algorithm, garbage)


def test_unsupported_algorithm() -> None:
    with pytest.raises(ValueError):
        ResumableHash("sha1")
    with pytest.raises(ValueError):
        ResumableHash.from_state("sha1", b"")


def test_unavailable_library_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    state = ResumableHash("sha256").state()
    monkeypatch.setattr(hashstate, "UNAVAILABLE_REASON", "libcrypto not found")
    with pytest.raises(HashStateUnavailable, match="libcrypto not found"):
        ResumableHash("sha256")
    with pytest.raises(HashStateUnavailable):
        ResumableHash.from_state("sha256", state)
    with pytest.raises(HashStateUnavailable):
        ChecksumLane("sha256")


def test_two_threads_hash_concurrently_and_correctly() -> None:
    blocks = [os.urandom(1 << 20), os.urandom(1 << 20)]
    results: dict[int, str] = {}

    def work(i: int) -> None:
        hasher = ResumableHash(ALGORITHMS[i % 2])
        view = memoryview(bytearray(blocks[i]))
        for _ in range(32):
            hasher.update(view)
        results[i] = hasher.hexdigest()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        assert results[i] == hashlib.new(ALGORITHMS[i % 2], blocks[i] * 32).hexdigest()


def test_update_releases_the_gil() -> None:
    """While one long update runs in a thread, Python code keeps running in another: the
    longest pause of a busy loop stays far below the duration of the call (with the GIL
    held, as with ctypes.PyDLL, the pause is the whole call)."""
    data = bytes(256 << 20)
    looping = threading.Event()
    done = threading.Event()
    took: list[float] = []

    def work() -> None:
        hasher = ResumableHash("md5")
        assert looping.wait(10)  # the busy loop below is measuring
        t0 = time.perf_counter()
        hasher.update(data)  # one call, several hundred milliseconds
        took.append(time.perf_counter() - t0)
        done.set()

    thread = threading.Thread(target=work)
    thread.start()
    longest_pause = 0.0
    last = time.perf_counter()
    looping.set()
    while not done.is_set():
        now = time.perf_counter()
        longest_pause = max(longest_pause, now - last)
        last = now
    thread.join()
    assert longest_pause < took[0] / 2, (longest_pause, took[0])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_checksum_lane_resumes(algorithm: str) -> None:
    data = os.urandom(3 << 20)
    lane = ChecksumLane(algorithm)
    assert (lane.name, lane.algorithm) == (algorithm, algorithm)
    lane.update(memoryview(bytearray(data[: 1 << 20])))
    assert lane.bytes_hashed == 1 << 20
    resumed = ChecksumLane.resume(algorithm, lane.state())
    assert resumed.bytes_hashed == 1 << 20
    resumed.update(memoryview(bytearray(data[1 << 20 :])))
    resumed.finish()
    assert resumed.hexdigest() == hashlib.new(algorithm, data).hexdigest()
    with pytest.raises(ValueError):
        ChecksumLane.resume(algorithm, b"garbage")
