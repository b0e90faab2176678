"""`dvcr-uploader` as a user runs it: the seed docs' upload walk-through."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from diskimages import MiB
from serverproc import Server

SOME_IMAGE = """\
apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: some-image
spec:
  # Настройки хранения проектного образа.
  storage: PersistentVolumeClaim
  # Настройки источника образа.
  dataSource:
    type: Upload
"""


def cli(server: Server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DVCR_SERVER": server.url},
    )


def test_seed_upload_walkthrough(server: Server, tmp_path: Path) -> None:
    applied = cli(server, "apply", "-f", "-", stdin=SOME_IMAGE)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == "virtualimage.virtualization.deckhouse.io/some-image created\n"

    urls = cli(server, "get", "vi", "some-image", "-o", "jsonpath={.status.imageUploadURLs}")
    parsed = json.loads(urls.stdout)
    assert set(parsed) == {"external", "inCluster"}

    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uploader.cli",
            "--server",
            server.url,
            "get",
            "vi",
            "some-image",
            "-w",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watch.stdout is not None
    first_rows = [watch.stdout.readline(), watch.stdout.readline()]
    image = tmp_path / "cirros.img"
    image.write_bytes(os.urandom(48 * MiB))
    upload = subprocess.run(
        ["curl", "--limit-rate", "24M", "--progress-bar", "-T", str(image), parsed["external"]],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"phase": "Ready"' in upload.stdout

    table = cli(server, "get", "vi", "some-image")
    lines = table.stdout.splitlines()
    assert re.fullmatch(r"NAME\s+PHASE\s+CDROM\s+PROGRESS\s+AGE", lines[0])
    assert re.fullmatch(r"some-image\s+Ready\s+false\s+100%\s+\d+s", lines[1])
    assert lines[0].index("PHASE") == lines[1].index("Ready")
    assert lines[0].index("PROGRESS") == lines[1].index("100%")

    watch.terminate()
    rows = "".join(first_rows).splitlines() + watch.communicate(timeout=10)[0].splitlines()
    assert rows[0].split() == ["NAME", "PHASE", "CDROM", "PROGRESS", "AGE"]
    phases = [row.split()[1] for row in rows[1:]]
    assert phases[0] == "WaitForUserUpload"
    assert "Provisioning" in phases
    assert phases[-1] == "Ready"
    progress = [row.split()[3] for row in rows[1:] if row.split()[1] == "Provisioning"]
    assert any(re.fullmatch(r"\d+\.\d%", p) for p in progress), rows


def test_apply_unchanged_and_configured(server: Server) -> None:
    assert cli(server, "apply", "-f", "-", stdin=SOME_IMAGE).returncode == 0
    again = cli(server, "apply", "-f", "-", stdin=SOME_IMAGE)
    assert again.stdout.endswith("some-image unchanged\n")
    changed = SOME_IMAGE.replace(
        "type: Upload", "type: Upload\n    upload: {checksum: {md5: " + "c" * 32 + "}}"
    )
    configured = cli(server, "apply", "-f", "-", stdin=changed)
    assert configured.returncode == 0, configured.stderr
    assert configured.stdout.endswith("some-image configured\n")


def test_apply_many_documents_from_a_file(server: Server, tmp_path: Path) -> None:
    docs = [yaml.safe_load(SOME_IMAGE.replace("some-image", f"img-{i}")) for i in range(3)]
    path = tmp_path / "images.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = cli(server, "apply", "-f", str(path), "-n", "team")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3
    listed = cli(server, "get", "vi", "-n", "team", "-o", "jsonpath={.items[*].metadata.name}")
    assert listed.stdout.split() == ["img-0", "img-1", "img-2"]
    assert cli(server, "get", "vi").stderr.strip() == "No resources found in default namespace."


def test_apply_reports_validation_errors(server: Server) -> None:
    bad = SOME_IMAGE.replace("PersistentVolumeClaim", "Tape")
    out = cli(server, "apply", "-f", "-", stdin=bad)
    assert out.returncode == 1
    assert "Error from server (Invalid)" in out.stderr
    assert "spec.storage" in out.stderr


def test_output_formats_describe_delete(server: Server) -> None:
    cli(server, "apply", "-f", "-", stdin=SOME_IMAGE)
    as_json = json.loads(cli(server, "get", "vi", "some-image", "-o", "json").stdout)
    assert as_json["kind"] == "VirtualImage"
    as_yaml = yaml.safe_load(cli(server, "get", "virtualimage", "some-image", "-o", "yaml").stdout)
    assert as_yaml["metadata"]["uid"] == as_json["metadata"]["uid"]
    wide = cli(server, "get", "vi", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == [
        "NAME",
        "PHASE",
        "CDROM",
        "PROGRESS",
        "AGE",
        "STORAGE",
        "FORMAT",
        "SIZE",
        "UNPACKED",
    ]
    phase = cli(server, "get", "vi", "some-image", "-o", "jsonpath={.status.phase}")
    assert phase.stdout.strip() == "WaitForUserUpload"
    ranged = cli(
        server,
        "get",
        "vi",
        "-o",
        'jsonpath={range .items[*]}{.metadata.name}:{.status.phase}{"\\n"}{end}',
    )
    assert ranged.stdout == "some-image:WaitForUserUpload\n"

    described = cli(server, "describe", "vi", "some-image").stdout
    assert "Name:         some-image" in described
    assert "WaitForUserUpload" in described
    assert "Conditions:" in described

    deleted = cli(server, "delete", "vi", "some-image")
    assert deleted.stdout == 'virtualimage.virtualization.deckhouse.io "some-image" deleted\n'
    missing = cli(server, "get", "vi", "some-image")
    assert missing.returncode == 1
    assert "Error from server (NotFound)" in missing.stderr


def test_unknown_resource_and_unreachable_server(server: Server) -> None:
    out = cli(server, "get", "pods")
    assert out.returncode == 1
    assert 'resource type "pods"' in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "uploader.cli", "--server", "http://127.0.0.1:9", "get", "vi"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert "cannot reach the server" in out.stderr
