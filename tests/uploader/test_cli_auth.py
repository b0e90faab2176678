"""The client's side of access (README: "Access, and what the server refuses"): bearer
tokens from `--token`, `DVCR_TOKEN` or `DVCR_TOKEN_FILE`, and TLS checked against
`--certificate-authority` or skipped with `--insecure-skip-tls-verify`. Real server, real
certificates, the command as a subprocess.

The tests named `..._needs_server_access` need the server's access layer (401 without a
known token when `--api-token-file` is given)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from diskimages import MiB, write_disk_image
from serverproc import Server, manifest
from testcerts import make_ca, make_server_cert

TOKEN = "s3cret-token-of-alice"
HOW = (
    "error: You must be logged in to the server (Unauthorized): give a token with --token, "
    "DVCR_TOKEN, or DVCR_TOKEN_FILE (the server's own: DVCR_TOKEN_FILE=DATA_DIR/admin.token)\n"
)


def cli(
    server_url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The command with only what the test gives: no token or CA from the environment."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DVCR_TOKEN", "DVCR_TOKEN_FILE", "SSL_CERT_FILE", "SSL_CERT_DIR")
    }
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "DVCR_SERVER": server_url, **(env or {})},
    )


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[Server]:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {"tokens": [{"user": "alice", "token": TOKEN, "role": "admin", "namespaces": "*"}]}
        )
    )
    with Server(tmp_path / "data", "--api-token-file", str(tokens), token=TOKEN).start() as srv:
        yield srv


def test_without_a_token_the_error_says_how_to_give_one_needs_server_access(
    token_server: Server,
) -> None:
    out = cli(token_server.url, "get", "vi")
    assert out.returncode == 1
    assert out.stderr == HOW


def test_token_from_flag_env_or_file_needs_server_access(
    token_server: Server, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(f"  {TOKEN}\n")
    for how in (
        cli(token_server.url, "get", "vi", "--token", TOKEN),
        cli(token_server.url, "--token", TOKEN, "get", "vi"),
        cli(token_server.url, "get", "vi", env={"DVCR_TOKEN": TOKEN}),
        cli(token_server.url, "get", "vi", env={"DVCR_TOKEN_FILE": str(token_file)}),
    ):
        assert how.returncode == 0, how.stderr
        assert how.stderr == "No resources found in default namespace.\n"


def test_the_flag_wins_over_the_environment_needs_server_access(
    token_server: Server, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN)
    flag_first = cli(token_server.url, "get", "vi", "--token", "wrong-1", env={"DVCR_TOKEN": TOKEN})
    env_next = cli(
        token_server.url,
        "get",
        "vi",
        env={"DVCR_TOKEN": "wrong-2", "DVCR_TOKEN_FILE": str(token_file)},
    )
    assert flag_first.returncode == env_next.returncode == 1
    assert flag_first.stderr == (
        "error: You must be logged in to the server (Unauthorized): the server does not "
        "accept the token from --token\n"
    )
    assert env_next.stderr.endswith("the server does not accept the token from DVCR_TOKEN\n")
    for out in (flag_first, env_next):
        assert "wrong-" not in out.stderr + out.stdout
        assert TOKEN not in out.stderr + out.stdout


def test_apply_and_upload_by_name_with_a_token_needs_server_access(
    token_server: Server, tmp_path: Path
) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 4 * MiB, seed=41)
    doc = tmp_path / "image.yaml"
    doc.write_text(yaml.safe_dump(manifest("with-token")))
    env = {"DVCR_TOKEN": TOKEN}
    applied = cli(token_server.url, "apply", "-f", str(doc), env=env)
    assert applied.returncode == 0, applied.stderr
    refused = cli(token_server.url, "upload", "-q", str(image), "vi/with-token")
    assert (refused.returncode, refused.stderr) == (1, HOW)

    uploaded = cli(token_server.url, "upload", "-q", str(image), "vi/with-token", env=env)

    assert uploaded.returncode == 0, uploaded.stderr
    assert f"sha256 {sha256}: the image holds {image}" in uploaded.stderr
    assert token_server.get("with-token")["status"]["checksum"]["sha256"] == sha256


def test_token_mistakes_are_one_line_and_never_show_the_token(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"
    missing = cli(url, "get", "vi", env={"DVCR_TOKEN_FILE": str(tmp_path / "none")})
    assert (missing.returncode, missing.stderr) == (
        1,
        f"error: cannot read the token file {tmp_path / 'none'}: No such file or directory\n",
    )
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    blank = cli(url, "get", "vi", env={"DVCR_TOKEN_FILE": str(empty)})
    assert (blank.returncode, blank.stderr) == (1, f"error: the token file {empty} is empty\n")
    spaced = cli(url, "get", "vi", "--token", "two words-secret")
    assert (spaced.returncode, spaced.stderr) == (
        1,
        "error: the token from --token has characters a bearer token cannot have\n",
    )


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, Path]]:
    """A server with a certificate of a CA nobody trusts by default; yields it and the CA's
    file. This test process trusts the CA (for the fixture's own calls); the commands it
    runs do not, unless told."""
    ca = make_ca()
    pair = make_server_cert(ca)
    ca_file, cert, key = tmp_path / "ca.pem", tmp_path / "tls.crt", tmp_path / "tls.key"
    ca_file.write_bytes(ca.cert_pem)
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    srv = Server(tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key))
    srv.url = srv.url.replace("http://", "https://")
    srv.start()
    try:
        yield srv, ca_file
    finally:
        srv.stop()


def test_api_over_tls(tls_server: tuple[Server, Path]) -> None:
    server, ca_file = tls_server
    started = time.monotonic()
    untrusted = cli(server.url, "get", "vi")
    assert time.monotonic() - started < 10
    assert untrusted.returncode == 1
    assert len(untrusted.stderr.splitlines()) == 1, untrusted.stderr
    assert untrusted.stderr.startswith(
        f"error: cannot reach the server at {server.url}: TLS: certificate verify failed: "
    )
    assert "--certificate-authority FILE" in untrusted.stderr

    trusted = cli(server.url, "get", "vi", "--certificate-authority", str(ca_file))
    assert trusted.returncode == 0, trusted.stderr
    skipped = cli(server.url, "get", "vi", "--insecure-skip-tls-verify")
    assert skipped.returncode == 0, skipped.stderr
    no_file = cli(server.url, "get", "vi", "--certificate-authority", str(ca_file) + ".gone")
    assert no_file.returncode == 2
    assert no_file.stderr.splitlines()[-1].endswith(f"{ca_file}.gone: no such file")


def test_upload_over_tls(tls_server: tuple[Server, Path], tmp_path: Path) -> None:
    server, ca_file = tls_server
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 4 * MiB, seed=42)
    server.create(manifest("tls-a"))
    server.create(manifest("tls-b"))
    url_a, url_b = server.upload_url("tls-a"), server.upload_url("tls-b")

    started = time.monotonic()
    untrusted = cli(server.url, "upload", "-q", str(image), url_a)
    assert time.monotonic() - started < 10  # no retries
    assert untrusted.returncode == 1
    assert "(try" not in untrusted.stderr
    [line] = untrusted.stderr.splitlines()
    assert line.startswith(f"error: TLS error with {server.url}: certificate verify failed: ")
    assert url_a.rsplit("/", 1)[1] not in line  # the upload token stays out of it

    trusted = cli(
        server.url, "upload", "-q", "--certificate-authority", str(ca_file), str(image), url_a
    )
    assert trusted.returncode == 0, trusted.stderr
    skipped = cli(server.url, "upload", "-q", "-k", str(image), url_b)
    assert skipped.returncode == 0, skipped.stderr
    by_name = cli(
        server.url, "upload", "--certificate-authority", str(ca_file), str(image), "vi/tls-b"
    )
    assert by_name.returncode == 0, by_name.stderr
    assert f"already uploaded: vi/tls-b is Ready and holds {image} (sha256 {sha256})" in (
        by_name.stderr
    )
