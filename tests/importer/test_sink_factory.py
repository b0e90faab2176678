"""The one wiring of sinks, for the server and the importer job."""

from __future__ import annotations

from pathlib import Path

import pytest

from importer.formats.base import Limits
from importer.formats.decoder import ImageDecoder
from importer.sinks.factory import ClaimLocation, SinkFactory
from importer.sinks.pvc import BlockClaimTarget, FileClaimTarget
from importer.sinks.throttle import ENV_SINK_RATE, ThrottledTarget

MiB = 1 << 20


def test_a_filesystem_claim_is_bounded_by_the_limit(tmp_path: Path) -> None:
    sink = SinkFactory(Limits(max_virtual_size=64 * MiB)).claim_sink(
        ClaimLocation(tmp_path, block=False)
    )
    try:
        assert isinstance(sink.target, FileClaimTarget)
        assert sink.target.capacity == 64 * MiB
        assert isinstance(sink.decode.decoder, ImageDecoder)
        assert sink.decode.decoder.target is sink.target
    finally:
        sink.target.abort()


def test_a_block_claim_is_written_in_place(tmp_path: Path) -> None:
    device = tmp_path / "device"
    device.write_bytes(bytes(MiB))
    sink = SinkFactory(Limits()).claim_sink(ClaimLocation(device, block=True))
    try:
        assert isinstance(sink.target, BlockClaimTarget)
        assert sink.target.path == device
    finally:
        sink.target.abort()


def test_the_fault_rate_slows_only_the_decoder_s_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_SINK_RATE, str(8 * MiB))
    sink = SinkFactory(Limits()).claim_sink(ClaimLocation(tmp_path, block=False))
    try:
        assert isinstance(sink.target, FileClaimTarget)
        assert isinstance(sink.decode.decoder.target, ThrottledTarget)
    finally:
        sink.target.abort()
