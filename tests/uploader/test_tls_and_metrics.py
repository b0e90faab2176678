"""HTTPS upload URLs and the separate metrics listener."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
from diskimages import MiB
from serverproc import Server, free_port, manifest


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_upload_and_metrics_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed(tmp_path)
    metrics_port = free_port()
    srv = Server(
        tmp_path / "data",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--external-url",
        "https://uploads.example.com",
    )
    srv.url = srv.url.replace("http://", "https://")
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # this test's client trusts the cert
        srv.start()
        obj = srv.create(manifest("secure"))
        urls = obj["status"]["imageUploadURLs"]
        token = urls["inCluster"].rsplit("/", 1)[1]
        assert urls["external"] == f"https://uploads.example.com/upload/{token}"
        assert urls["inCluster"] == f"{srv.url}/upload/{token}"
        image = tmp_path / "disk.raw"
        image.write_bytes(os.urandom(3 * MiB))
        out = subprocess.run(
            ["curl", "-sS", "--cacert", str(cert), "-T", str(image), urls["inCluster"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert json.loads(out)["phase"] == "Ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            text = response.read().decode()
        uid = obj["metadata"]["uid"]
        assert f'registry_progress{{ownerUID="{uid}"}} 100.0' in text
    finally:
        srv.stop()
