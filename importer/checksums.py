"""Checksums of the bytes as received, each in a lane of its own."""

from __future__ import annotations

import hashlib

from importer.errors import BadImageChecksum

SUPPORTED = ("sha256", "md5")


class ChecksumLane:
    """Hashes the received stream; runs in its own thread (hashlib releases the GIL)."""

    def __init__(self, algorithm: str) -> None:
        if algorithm not in SUPPORTED:
            raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.name = algorithm
        self._hash = hashlib.new(algorithm)

    def update(self, data: memoryview) -> None:
        self._hash.update(data)

    def finish(self) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def verify_checksums(actual: dict[str, str], expected: dict[str, str]) -> None:
    """Raises BadImageChecksum naming the first algorithm whose digest differs."""
    for algorithm, want in expected.items():
        got = actual.get(algorithm)
        if got is not None and got != want.strip().lower():
            raise BadImageChecksum(
                f"{algorithm} of the received image is {got}, but the spec expects {want}"
            )
