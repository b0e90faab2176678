"""`python -m bench.measure_push` end to end on a small blob: a real docker-registry, one
round of each sender."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_measure_push_prints_both_senders_and_their_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.measure_push", "4", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-4] == "4 MiB x 1 rounds, alternating order"
    assert lines[-3].lstrip().startswith("client   median")
    assert lines[-2].lstrip().startswith("curl -T  median")
    assert lines[-1].lstrip().startswith("client / curl -T (medians):")
