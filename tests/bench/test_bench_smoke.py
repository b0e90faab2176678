"""The benchmark harness end to end on a tiny file: real servers, real curl, one round."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(90)


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["--size", "16MiB", "--rounds", "1", "--warmup", "0", "--tmp-dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *argv, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_bench_prints_a_table_with_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "result.json"
    proc = run_bench(tmp_path, "--json", str(out_json))
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| scenario"))
    assert "ratio" in header and "our peak RSS" in header
    for scenario in (
        "raw-sha256",
        "raw-sha256-md5",
        "qcow2-pvc",
        "raw-dvcr-layout",
        "http-import-pvc",
    ):
        row = next(line for line in lines if line.startswith(f"| {scenario} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d\d", cells[4]), row  # the ratio
        assert cells[7].endswith("MiB"), row  # peak RSS

    result = json.loads(out_json.read_text())
    rows = {(r["scenario"], r["baseline"]): r for r in result["rows"]}
    assert set(rows) == {
        *(
            (s, b)
            for s in ("raw-sha256", "raw-sha256-md5", "raw-dvcr-layout")
            for b in ("nginx PUT", "nginx PUT+fsync")
        ),
        ("qcow2-pvc", "nginx PUT + qemu-img convert"),
        ("raw-dvcr-registry", "curl PATCH to registry"),
        ("http-import-pvc", "curl -o"),
        ("http-import-pvc", "curl -o+fsync"),
    }
    for row in rows.values():
        assert row["ratio"] > 0 and row["ours_mbps"] > 0 and row["baseline_mbps"] > 0
        assert row["peak_rss_kib"] > 0
    # The run's directory (data, targets, server state) is gone.
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_candidate_checkout_runs_in_the_same_rounds(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "--scenarios", "raw-sha256", "--candidate", f"same={REPO}")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| raw-sha256")]
    assert len(rows) == 4  # ours and the candidate, each against both nginx figures
    assert sum("[same]" in row for row in rows) == 2
    assert f"code from {REPO}" in proc.stdout
