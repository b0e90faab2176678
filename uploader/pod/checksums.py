"""The checksums of `UPLOADER_CHECKSUMS`, each checked by whoever can compute it.

Deckhouse's controller passes every algorithm of the resource's checksum section. sha256
and md5 go into the image's spec, and the server's pipeline checks them as it does for
any upload. sha1 and sha512 have no lane there; `CheckedSink` adds one each (hashlib,
which releases the GIL on large blocks) and refuses the image before the destination
sink writes its tag. GOST R 34.11-2012 (Streebog) is in neither hashlib nor OpenSSL's
default provider: an image that names it cannot be checked here, and fails at start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from importer.checksums import verify_checksums
from importer.formats.base import ImageInfo
from importer.lane import Lane
from importer.pipeline import Sink, TransferResult

IN_THE_SPEC = ("sha256", "md5")
IN_THE_SINK = ("sha1", "sha512")
NOT_COMPUTABLE = ("streebog256", "streebog512")


def for_the_spec(checksums: Mapping[str, str]) -> dict[str, str]:
    return {alg: value for alg, value in checksums.items() if alg in IN_THE_SPEC}


def for_the_sink(checksums: Mapping[str, str]) -> dict[str, str]:
    return {alg: value for alg, value in checksums.items() if alg in IN_THE_SINK}


def not_computable(checksums: Mapping[str, str]) -> list[str]:
    return sorted(alg for alg in checksums if alg in NOT_COMPUTABLE)


class DigestLane:
    """One hashlib digest of the received stream."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self.name = f"pod-{algorithm}"
        self._hash = hashlib.new(algorithm)

    def update(self, data: memoryview) -> None:
        self._hash.update(data)

    def finish(self) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class CheckedSink:
    """`inner`, and a lane per expected digest; `commit` refuses the image (no tag) when
    a digest differs."""

    def __init__(self, inner: Sink, expected: Mapping[str, str]) -> None:
        self.inner = inner
        self.expected = dict(expected)
        self.digests = [DigestLane(algorithm) for algorithm in sorted(self.expected)]

    def lanes(self) -> Sequence[Lane]:
        return [*self.inner.lanes(), *self.digests]

    def image_info(self) -> ImageInfo:
        return self.inner.image_info()

    async def commit(self, result: TransferResult) -> None:
        actual = {lane.algorithm: lane.hexdigest() for lane in self.digests}
        verify_checksums(actual, self.expected, expected_by="UPLOADER_CHECKSUMS")
        await self.inner.commit(result)

    async def abort(self) -> None:
        await self.inner.abort()
