"""`python -m bench.hashspeed`: hashlib against the resumable hashers of importer.hashstate.

Standalone (no servers, not one of the harness's scenarios). Hashes the same 1 MiB block
over and over, as a checksum lane does, with one thread and then with several threads
hashing at once (each its own hasher, the total split between them), for hashlib and for
the ctypes/libcrypto hashers; the contenders alternate round by round and the table shows
the median MB/s. With `--buffers` it also compares the kinds of buffer the ctypes path
takes (writable memoryview, bytes, read-only memoryview, and a copy for reference).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

from bench.units import MiB, format_size, mb_per_s, parse_size
from importer import hashstate

Hasher = Callable[[], object]


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hashlib(algorithm: str) -> Hasher:
    return lambda: hashlib.new(algorithm)


def _ctypes(algorithm: str) -> Hasher:
    return lambda: hashstate.ResumableHash(algorithm)


def _hash_blocks(make: Hasher, block: object, count: int, wrap: Callable[[object], object]) -> str:
    hasher = make()
    update = hasher.update  # type: ignore[attr-defined]
    for _ in range(count):
        update(wrap(block))
    return hasher.hexdigest()  # type: ignore[attr-defined]


def run_once(
    make: Hasher,
    total: int,
    block_size: int,
    threads: int,
    kind: str = "rw",
) -> float:
    """Seconds to hash `total` bytes in `block_size` updates, split over `threads`."""
    blocks_per_thread = max(1, total // block_size // threads)
    data = os.urandom(block_size)
    buffers: list[object] = []
    for _ in range(threads):
        if kind == "bytes":
            buffers.append(bytes(data))
        elif kind == "ro":
            buffers.append(memoryview(bytes(data)))
        else:  # "rw" (the pipeline's blocks) and "copy"
            buffers.append(memoryview(bytearray(data)))
    wrap: Callable[[object], object] = bytes if kind == "copy" else (lambda b: b)
    start_line = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(buf: object) -> None:
        try:
            start_line.wait()
            _hash_blocks(make, buf, blocks_per_thread, wrap)
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=work, args=(b,)) for b in buffers]
    for worker in workers:
        worker.start()
    start_line.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


def measure(
    contenders: dict[str, Hasher],
    total: int,
    block_size: int,
    threads: int,
    rounds: int,
    kind: str = "rw",
) -> dict[str, float]:
    """Median MB/s per contender, rounds interleaved (A B A B ...)."""
    done = block_size * max(1, total // block_size // threads) * threads
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, make in contenders.items():
            rates[name].append(mb_per_s(done, run_once(make, total, block_size, threads, kind)))
    return {name: statistics.median(values) for name, values in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hashspeed", description=__doc__)
    parser.add_argument("--total", type=_size, default=2 << 30, help="bytes per run (2GiB)")
    parser.add_argument("--block", type=_size, default=MiB, help="update size (1MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (3)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the parallel run (2)")
    parser.add_argument("--algorithms", default="sha256,md5", help="sha256,md5")
    parser.add_argument("--buffers", action="store_true", help="also compare buffer kinds")
    args = parser.parse_args(argv)
    if not hashstate.AVAILABLE:
        print(f"resumable hashers unavailable: {hashstate.UNAVAILABLE_REASON}", file=sys.stderr)
        return 1
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    print(
        f"{format_size(args.total)} per run in {format_size(args.block)} updates, "
        f"median of {args.rounds} rounds, {os.cpu_count()} CPUs"
    )
    print()
    print("| algorithm | threads | hashlib MB/s | ctypes MB/s | ctypes/hashlib |")
    print("|---|---|---|---|---|")
    for algorithm in algorithms:
        contenders = {"hashlib": _hashlib(algorithm), "ctypes": _ctypes(algorithm)}
        for threads in sorted({1, args.threads}):
            rates = measure(contenders, args.total, args.block, threads, args.rounds)
            print(
                f"| {algorithm} | {threads} | {rates['hashlib']:.0f} | {rates['ctypes']:.0f} | "
                f"{rates['ctypes'] / rates['hashlib']:.3f} |",
                flush=True,
            )
    if args.buffers:
        print()
        print("| ctypes sha256, 1 thread, buffer | MB/s |")
        print("|---|---|")
        make = {"ctypes": _ctypes("sha256")}
        for kind, label in (
            ("rw", "writable memoryview (bytearray)"),
            ("bytes", "bytes"),
            ("ro", "read-only memoryview over bytes"),
            ("copy", "bytes(memoryview) copy each update"),
        ):
            rate = measure(make, args.total, args.block, 1, args.rounds, kind)["ctypes"]
            print(f"| {label} | {rate:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
