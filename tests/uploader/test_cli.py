"""`dvcr-uploader` as a user runs it: the seed docs' upload walk-through."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from diskimages import MiB
from flakyhttp import closed_port
from serverproc import Server

from uploader.cli import build_parser, main
from uploader.server.config import ServerConfig

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


def _env(server: Server) -> dict[str, str]:
    env = {**os.environ, "DVCR_SERVER": server.url}
    if server.token is not None:
        env["DVCR_TOKEN"] = server.token
    return env


def run_cli(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """The command, by default with no server behind --server (for mistakes found before
    it would be asked anything)."""
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DVCR_SERVER": f"http://127.0.0.1:{closed_port()}", **env},
    )


def cli(server: Server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, stdin=stdin, **_env(server))


@pytest.fixture(params=["loopback", "every address, DVCR_TOKEN"])
def walk_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """The walk-through's server: on loopback, open; on every address, with the admin token
    it writes on its first start."""
    if request.param == "loopback":
        srv = Server(tmp_path / "data").start()
    else:
        srv = Server(tmp_path / "data", host="0.0.0.0").start()
        srv.token = (srv.data_dir / "admin.token").read_text().strip()
    try:
        yield srv
    finally:
        srv.stop()


def test_seed_upload_walkthrough(walk_server: Server, tmp_path: Path) -> None:
    server = walk_server
    if server.token is not None:
        refused = subprocess.run(
            [sys.executable, "-m", "uploader.cli", "--server", server.url, "get", "vi"],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("DVCR_")},
        )
        assert refused.returncode == 1
        assert "Unauthorized" in refused.stderr
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
        env=_env(server),
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


# -- mistakes: one line, no traceback ----------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("a: [1, 2\n", "error: error parsing standard input: line 2, column 1: "),
        ("", "error: no objects passed to apply"),
        ("# nothing but a comment\n---\n", "error: no objects passed to apply"),
        ("- 1\n- 2\n", "error: standard input: document 1 is not an object"),
        ("kind: List\nitems: [3]\n", "error: standard input: document 1 is not an object"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
            'error: no matches for kind "Pod" in version "v1"',
        ),
        ("kind: [VirtualImage]\n", "error: no matches for kind \"['VirtualImage']\""),
    ],
)
def test_apply_input_mistakes_are_one_line(stdin: str, message: str) -> None:
    out = run_cli("apply", "-f", "-", stdin=stdin)
    assert out.returncode == 1
    assert out.stdout == ""
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(message), out.stderr


def test_apply_path_mistakes_are_one_line(tmp_path: Path) -> None:
    missing = run_cli("apply", "-f", str(tmp_path / "nope.yaml"))
    assert (missing.returncode, missing.stderr) == (
        1,
        f'error: the path "{tmp_path / "nope.yaml"}" does not exist\n',
    )
    directory = run_cli("apply", "-f", str(tmp_path))
    assert directory.returncode == 1
    assert directory.stderr.startswith(f'error: the path "{tmp_path}" is a directory')
    assert len(directory.stderr.splitlines()) == 1
    binary = tmp_path / "image.raw"
    binary.write_bytes(b"\xff\xfe\x00" * 10)
    undecodable = run_cli("apply", "-f", str(binary))
    assert (undecodable.returncode, undecodable.stderr) == (
        1,
        f"error: {binary} is not UTF-8 text\n",
    )


def test_unreachable_server_is_one_line() -> None:
    port = closed_port()
    out = run_cli("get", "vi", DVCR_SERVER=f"http://127.0.0.1:{port}")
    assert out.returncode == 1
    assert out.stderr == (
        f"error: cannot reach the server at http://127.0.0.1:{port}: Connection refused\n"
    )
    apply = run_cli("apply", "-f", "-", stdin=SOME_IMAGE, DVCR_SERVER=f"http://127.0.0.1:{port}")
    assert apply.returncode == 1
    assert apply.stderr.startswith("error: cannot reach the server at ")
    assert len(apply.stderr.splitlines()) == 1
    bad_url = run_cli("--server", "localhost:8444", "get", "vi")
    assert bad_url.returncode == 1
    assert bad_url.stderr == (
        "error: the server URL 'localhost:8444' is not an http:// or https:// URL\n"
    )


def test_unknown_words_and_flags() -> None:
    word = run_cli("describe", "pods", "x")
    assert (word.returncode, word.stderr) == (
        1,
        'error: the server doesn\'t have a resource type "pods"\n',
    )
    flag = run_cli("get", "vi", "--colour")
    assert flag.returncode == 2  # argparse's usage error
    assert flag.stderr.splitlines()[-1] == "dvcr-uploader: error: unrecognized arguments: --colour"
    assert "Traceback" not in flag.stderr


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout == f"dvcr-uploader {importlib.metadata.version('dvcr-uploader')}\n"


def test_serve_help_has_only_server_flags() -> None:
    text = run_cli("serve", "--help").stdout
    for server_flag in ("--listen", "--api-listen", "--api-token-file", "--import-allow"):
        assert server_flag in text
    for client_flag in ("--server", "--namespace", "--token", "--certificate-authority"):
        assert client_flag not in text
    get_help = run_cli("get", "--help").stdout
    for client_flag in ("--server", "--token", "--insecure-skip-tls-verify"):
        assert client_flag in get_help


def test_every_flag_has_help() -> None:
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = {"": parser, **commands.choices}
    missing = [
        f"{name} {action.dest}"
        for name, each in parsers.items()
        for action in each._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--api-listen", "8444"], "argument --api-listen: '8444' is not HOST:PORT"),
        (["--listen", "0.0.0.0:99999"], "argument --listen: '0.0.0.0:99999' is not HOST:PORT"),
        (["--import-allow", "10.0.0.300/8"], "argument --import-allow: '10.0.0.300/8' is not"),
        (["--lane-threads", "0"], "argument --lane-threads: '0' is not a whole number"),
        (["--max-images", "lots"], "argument --max-images: 'lots' is not a whole number"),
        (["--header-timeout", "soon"], "argument --header-timeout: 'soon' is not a duration"),
        (
            ["--api-token-file", "/nonexistent/t"],
            "argument --api-token-file: /nonexistent/t: no such",
        ),
    ],
)
def test_serve_flags_are_checked_before_it_starts(flags: list[str], message: str) -> None:
    out = run_cli("serve", "--data-dir", "/nonexistent/data", *flags)
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1].startswith("dvcr-uploader serve: error: " + message)


def test_serve_flags_make_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import uploader.server.app

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens: []\n")
    made: list[ServerConfig] = []

    async def run_server(config: ServerConfig) -> None:
        made.append(config)

    monkeypatch.setattr(uploader.server.app, "run_server", run_server)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # this test process keeps its loop
    flags = [
        "serve",
        "--api-listen=127.0.0.1:9444",
        f"--api-token-file={tokens}",
        "--import-allow=10.1.2.3/8",
        "--import-allow=fd00::1",
        "--header-timeout=1m",
        "--max-images-per-namespace=7",
        "--max-images=70",
        "--lane-threads=3",
    ]
    assert main(flags) == 0
    [config] = made
    assert config.api_listen == "127.0.0.1:9444"
    assert config.api_token_file == tokens
    assert config.import_allow == ("10.0.0.0/8", "fd00::1/128")
    assert config.header_timeout == 60
    assert (config.max_images_per_namespace, config.max_images, config.lane_threads) == (7, 70, 3)
    assert main(["serve"]) == 0
    defaults = made[-1]
    assert defaults.api_listen is None and defaults.import_allow == ()
    assert defaults.header_timeout == 30
