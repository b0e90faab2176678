"""Checksums of the bytes as received, each in a lane of its own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

from importer.errors import BadImageChecksum
from importer.hashstate import ResumableHash

SUPPORTED = ("sha256", "md5")


class ChecksumLane:
    """Hashes the received stream; runs in its own thread (the libcrypto calls release the
    GIL). Its state can be saved at any block boundary and resumed later, in this process
    or another one, with the same final digest as an uninterrupted stream."""

    def __init__(self, algorithm: str) -> None:
        if algorithm not in SUPPORTED:
            raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.name = algorithm
        self._hash = ResumableHash(algorithm)

    @classmethod
    def resume(cls, algorithm: str, state: bytes) -> Self:
        """The lane that `state()` saved; ValueError if `state` is not one of `algorithm`."""
        lane = cls(algorithm)
        lane._hash = ResumableHash.from_state(algorithm, state)
        return lane

    @property
    def bytes_hashed(self) -> int:
        """How many bytes of the stream the digest covers (kept across save and resume)."""
        return self._hash.bytes_hashed

    def update(self, data: memoryview) -> None:
        self._hash.update(data)

    def finish(self) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def state(self) -> bytes:
        """The running state as plain bytes (see importer.hashstate for the format)."""
        return self._hash.state()


def verify_checksums(
    actual: Mapping[str, str], expected: Mapping[str, str], expected_by: str = "the spec"
) -> None:
    """Raises BadImageChecksum naming the first algorithm whose digest differs (and what
    gave the expected one)."""
    for algorithm, want in expected.items():
        got = actual.get(algorithm)
        if got is not None and got != want.strip().lower():
            raise BadImageChecksum(
                f"{algorithm} of the received image is {got}, but {expected_by} expects {want}"
            )
