"""`dvcr-importer` as a pod runs it: environment only, exit code, termination message."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from containerdisks import OCI_TAR_GZIP, Layout, disk_layer, make_qcow2, skopeo_push
from diskimages import MiB, sha256_file, write_disk_image
from dvcrimage import check_image, skopeo_copy
from nginxproc import Nginx
from registryproc import Registry
from serverproc import free_port
from waiting import wait_until


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

    def progress_scraped() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
                text: str = response.read().decode()
        except OSError:
            return None
        return text if 'registry_progress{ownerUID="owner-7"}' in text else None

    try:
        scraped = str(
            wait_until(progress_scraped, timeout=20, interval=0.2, what="the progress metric")
        )
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert "registry_average_speed" in scraped


# -- registries ---------------------------------------------------------------------------


def test_registry_image_into_a_claim(registry: Registry, tmp_path: Path) -> None:
    qcow2 = make_qcow2(tmp_path, seed=91)
    layout = Layout(tmp_path / "layout")
    source = layout.tag("v1", layout.image([(disk_layer(qcow2), OCI_TAR_GZIP)]))
    skopeo_push(source, f"{registry.host}/images/cirros:v1", cache_dir=tmp_path / "cache")
    (tmp_path / "auth.json").write_text(json.dumps({"auths": {}}))
    code, message = run_importer(
        {
            "IMPORTER_SOURCE": "registry",
            "IMPORTER_ENDPOINT": f"docker://{registry.host}/images/cirros:v1",
            "IMPORTER_AUTH_CONFIG": str(tmp_path / "auth.json"),
            "IMPORTER_DESTINATION_ENDPOINT": str(tmp_path / "pvc"),
        },
        tmp_path,
    )
    assert code == 0, message
    assert message["source-image-format"] == "qcow2"
    assert message["source-image-size"] == len(qcow2)
    assert message["checksum"]["sha256"] == hashlib.sha256(qcow2).hexdigest()
    (tmp_path / "check.qcow2").write_bytes(qcow2)
    compare = subprocess.run(
        [
            "qemu-img",
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            tmp_path / "check.qcow2",
            tmp_path / "pvc" / "disk.img",
        ],
        capture_output=True,
    )
    assert compare.returncode == 0, compare.stdout


def test_http_into_a_registry_named_without_a_scheme(
    registry: Registry, nginx: Nginx, tmp_path: Path
) -> None:
    sha256, _ = write_disk_image(nginx.files / "disk.img", 12 * MiB, seed=92)
    # A plain-HTTP registry on loopback, named as host:port: HTTPS is tried, then HTTP.
    code, message = run_importer(
        {
            "IMPORTER_SOURCE": "http",
            "IMPORTER_ENDPOINT": f"{nginx.url}/disk.img",
            "IMPORTER_DESTINATION_ENDPOINT": f"{registry.host}/vi/default/disk:uid-1",
        },
        tmp_path,
    )
    assert code == 0, message
    out = tmp_path / "out"
    manifest = skopeo_copy(
        f"docker://{registry.host}/vi/default/disk:uid-1", out, "--src-tls-verify=false"
    )
    labels = check_image(out, manifest, sha256)
    assert labels["checksum-sha256"] == sha256


def test_dvcr_layout_image_into_a_claim(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(raw, 8 * MiB, seed=93)
    layout_dir = tmp_path / "dvcr"
    code, message = run_importer(
        {
            "IMPORTER_SOURCE": "filesystem",
            "IMPORTER_ENDPOINT": str(raw),
            "IMPORTER_DESTINATION_ENDPOINT": f"oci:{layout_dir}:vi/default/disk:u1",
        },
        tmp_path,
    )
    assert code == 0, message
    code, message = run_importer(
        {
            "IMPORTER_SOURCE": "dvcr",
            "IMPORTER_ENDPOINT": f"oci:{layout_dir}:vi/default/disk:u1",
            "IMPORTER_DESTINATION_ENDPOINT": str(tmp_path / "pvc"),
        },
        tmp_path,
    )
    assert code == 0, message
    assert message["checksum"]["sha256"] == sha256
    assert sha256_file(tmp_path / "pvc" / "disk.img") == sha256


def test_an_unreachable_registry_fails_with_its_cause(tmp_path: Path) -> None:
    code, message = run_importer(
        {
            "IMPORTER_SOURCE": "registry",
            "IMPORTER_ENDPOINT": f"127.0.0.1:{free_port()}/images/none:v1",
            "IMPORTER_DESTINATION_ENDPOINT": str(tmp_path / "pvc"),
        },
        tmp_path,
    )
    assert code == 1
    assert message["error-message"].startswith("SourceUnreachable")
