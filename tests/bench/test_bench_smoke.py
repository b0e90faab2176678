"""The benchmark harness end to end on a tiny file: real servers, real curl, one round.

Every run's answer is checked by the harness itself (a wrong answer, or a converted disk
that differs from the raw data, stops it with a non-zero exit), so a table means the
transfers were right. ovirt-imageio is installed by the harness into its cache the first
time (it needs PyPI); its rows must be there."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(240)

SCENARIOS = (
    "raw-sha256",
    "raw-sha256-md5",
    "qcow2-pvc",
    "qcow2-xz-pvc",
    "qcow2-zst-pvc",
    "raw-dvcr-layout",
    "raw-dvcr-registry",
    "http-import-pvc",
    "concurrent-8-pvc",
)


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["--size", "16MiB", "--rounds", "1", "--warmup", "0", "--tmp-dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *argv, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_bench_prints_a_table_with_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "result.json"
    proc = run_bench(tmp_path, "--json", str(out_json))
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| scenario"))
    assert "ratio" in header and "our peak RSS" in header
    for scenario in SCENARIOS:
        row = next(line for line in lines if line.startswith(f"| {scenario} "))
        cells = _cells(row)
        assert re.fullmatch(r"\d+\.\d\d", cells[4]), row  # the ratio
        assert cells[7].endswith("MiB"), row  # peak RSS
    # No baseline: our throughput, and the memory target instead of a ratio.
    slow = _cells(next(line for line in lines if line.startswith("| slow-sink-rss ")))
    assert slow[2:5] == ["-", "-", "-"] and slow[5] == "RSS <= 128 MiB", slow
    assert slow[6] in ("yes", "NO") and float(slow[1]) > 0, slow

    result = json.loads(out_json.read_text())
    rows = {(r["scenario"], r["baseline"]): r for r in result["rows"]}
    assert set(rows) == {
        ("raw-sha256", "imageio PUT"),
        ("raw-sha256-md5", "imageio PUT"),
        *(
            (s, b)
            for s in ("raw-sha256", "raw-sha256-md5", "raw-dvcr-layout")
            for b in ("nginx PUT", "nginx PUT+fsync")
        ),
        ("qcow2-pvc", "nginx PUT + qemu-img convert"),
        ("qcow2-xz-pvc", "nginx PUT + xz -d + qemu-img convert"),
        ("qcow2-zst-pvc", "nginx PUT + zstd -d + qemu-img convert"),
        ("raw-dvcr-registry", "curl PATCH to registry"),
        ("http-import-pvc", "curl -o"),
        ("http-import-pvc", "curl -o+fsync"),
        ("concurrent-8-pvc", "8 nginx PUTs"),
        ("concurrent-8-pvc", "8 nginx PUTs+fsync"),
        ("slow-sink-rss", None),
    }, proc.stderr
    for (_, baseline), row in rows.items():
        assert row["ours_mbps"] > 0 and row["peak_rss_kib"] > 0
        if baseline is not None:
            assert row["ratio"] > 0 and row["baseline_mbps"] > 0
    assert rows[("raw-sha256", "imageio PUT")]["target"] == 1.0
    assert rows[("slow-sink-rss", None)]["max_rss_mib"] == 128
    # The run's directory (data, targets, server state) is gone.
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_candidate_checkout_runs_in_the_same_rounds(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "--scenarios", "raw-sha256", "--candidate", f"same={REPO}")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| raw-sha256")]
    assert len(rows) == 6  # ours and the candidate, each against nginx (2 figures) and imageio
    assert sum("[same]" in row for row in rows) == 3
    assert f"code from {REPO}" in proc.stdout
