"""`dvcr-importer` as a pod runs it: environment only, exit code, termination message."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from diskimages import MiB, sha256_file, write_disk_image
from nginxproc import Nginx
from serverproc import free_port


def run_importer(env: dict[str, str], tmp_path: Path) -> tuple[int, dict]:
    term = tmp_path / "termination-log"
    done = subprocess.run(
        [sys.executable, "-m", "importer.cli", "--termination-message-path", str(term)],
        env={**os.environ, "IMPORTER_METRICS_LISTEN": "", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, json.loads(term.read_text())


def test_http_import_to_a_claim_directory(nginx: Nginx, tmp_path: Path) -> None:
    sha256, _ = write_disk_image(nginx.files / "disk.img", 24 * MiB, seed=31)
    claim = tmp_path / "pvc"
    code, message = run_importer(
        {
            "IMPORTER_SOURCE": "http",
            "IMPORTER_ENDPOINT": f"{nginx.url}/disk.img",
            "IMPORTER_DESTINATION_ENDPOINT": str(claim),
            "IMPORTER_CHECKSUMS": json.dumps({"sha256": sha256}),
            "OWNER_UID": "u-1",
        },
        tmp_path,
    )
    assert code == 0, message
    assert message["error-message"] == ""
    assert message["source-image-size"] == 24 * MiB
    assert message["source-image-virtual-size"] == 24 * MiB
    assert message["source-image-format"] == "raw"
    assert message["checksum"]["sha256"] == sha256
    assert message["average-speed"] > 0
    assert sha256_file(claim / "disk.img") == sha256


def test_filesystem_source_into_a_block_file(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    data = os.urandom(3 * MiB)
    source.write_bytes(data)
    device = tmp_path / "device"
    device.write_bytes(b"\xff" * (4 * MiB))
    code, message = run_importer(
        {
            "IMPORTER_SOURCE": "filesystem",
            "IMPORTER_ENDPOINT": str(source),
            "IMPORTER_DESTINATION_ENDPOINT": str(device),
        },
        tmp_path,
    )
    assert code == 0, message
    assert device.read_bytes() == data + bytes(MiB)


def test_failure_exit_code_and_message(nginx: Nginx, tmp_path: Path) -> None:
    (nginx.files / "disk.img").write_bytes(os.urandom(MiB))
    code, message = run_importer(
        {
            "IMPORTER_SOURCE": "http",
            "IMPORTER_ENDPOINT": f"{nginx.url}/disk.img",
            "IMPORTER_DESTINATION_ENDPOINT": str(tmp_path / "pvc"),
            "IMPORTER_CHECKSUMS": "md5:" + "0" * 32,
        },
        tmp_path,
    )
    assert code == 1
    assert message["error-message"].startswith("BadImageChecksum")
    assert not (tmp_path / "pvc" / "disk.img").exists()

    code, message = run_importer({"IMPORTER_SOURCE": "http"}, tmp_path)
    assert code == 2
    assert "--endpoint" in message["error-message"]


def test_metrics_while_running(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    source.write_bytes(hashlib.sha256(b"x").digest() * (24 * MiB // 32))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "importer.cli", "--termination-message-path", str(tmp_path / "t")],
        env={
            **os.environ,
            "IMPORTER_SOURCE": "filesystem",
            "IMPORTER_ENDPOINT": str(source),
            "IMPORTER_DESTINATION_ENDPOINT": str(tmp_path / "pvc"),
            "IMPORTER_METRICS_LISTEN": f"127.0.0.1:{port}",
            "OWNER_UID": "owner-7",
            "DVCR_FAULT_SINK_BYTES_PER_SEC": str(8 * MiB),  # slowed on purpose
        },
    )
    try:
        scraped = ""
        deadline = time.monotonic() + 20
        while 'registry_progress{ownerUID="owner-7"}' not in scraped:
            assert time.monotonic() < deadline, scraped
            time.sleep(0.2)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
                    scraped = response.read().decode()
            except OSError:
                continue
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert "registry_average_speed" in scraped
