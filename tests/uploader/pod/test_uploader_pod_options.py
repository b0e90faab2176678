"""The pod's start refuses what it cannot use, naming the variable, and `dvcr-uploader`
without a subcommand and without the destination still asks for a command."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from podproc import UPLOADER, deckhouse_env

from uploader.pod.options import OptionsError, is_pod_invocation, parse_checksums, parse_options


def _start(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(UPLOADER), "-v=3"],
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LISTEN_PORT", "84x4"),
        ("LISTEN_PORT", "70000"),
        ("HEALTHZ_PORT", "-1"),
        ("DESTINATION_INSECURE_TLS", "maybe"),
        ("UPLOADER_DESTINATION_AUTH_CONFIG", "/nonexistent/.dockerconfigjson"),
        ("TLS_CERT_FILE", "/nonexistent/tls.crt"),
        ("UPLOADER_CHECKSUMS", "sha256:xyz"),
        ("LISTEN_ADDRESS", "not an address"),
    ],
)
def test_a_malformed_variable_stops_the_start_naming_it(
    tmp_path: Path, variable: str, value: str
) -> None:
    env = deckhouse_env("127.0.0.1:1/vi/ns/name:tag")
    env[variable] = value
    result = _start(tmp_path, env)
    assert result.returncode == 2
    assert variable in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_endpoint_without_a_tag_is_refused(tmp_path: Path) -> None:
    result = _start(tmp_path, deckhouse_env("127.0.0.1:1/vi/ns/name"))
    assert result.returncode == 2
    assert "UPLOADER_DESTINATION_ENDPOINT" in result.stderr


def test_without_the_destination_the_client_still_wants_a_command(tmp_path: Path) -> None:
    result = _start(tmp_path, {})
    assert result.returncode == 2
    assert "COMMAND" in result.stderr or "required" in result.stderr


def test_pod_invocation_and_deckhouse_defaults() -> None:
    commands = {"serve", "get", "upload"}
    assert is_pod_invocation(["-v=3"], {"UPLOADER_DESTINATION_ENDPOINT": "h/r:t"}, commands)
    assert not is_pod_invocation(
        ["get", "vi"], {"UPLOADER_DESTINATION_ENDPOINT": "h/r:t"}, commands
    )
    assert not is_pod_invocation([], {}, commands)
    assert is_pod_invocation(["--destination-endpoint=h/r:t"], {}, commands)
    options = parse_options(
        ["-v=3"],
        {"UPLOADER_DESTINATION_ENDPOINT": "dvcr.svc/vi/ns/n:uid", "DESTINATION_INSECURE_TLS": ""},
    )
    assert (options.listen_address, options.listen_port, options.healthz_port) == (
        "0.0.0.0",
        8444,
        8080,
    )
    assert options.metrics_listen == "0.0.0.0:8443"
    assert str(options.termination_message_path) == "/dev/termination-log"
    assert options.destination_insecure is False
    assert options.verbosity == 3
    assert options.destination is not None and options.destination.repository == "vi/ns/n"


def test_checksums_as_the_controller_writes_them() -> None:
    # datasource.FormatChecksums: sorted `algorithm:sum` pairs, sums in lower case.
    value = ",".join(
        [
            "md5:5d41402abc4b2a76b9719d911017c592",
            "sha1:aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d",
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            f"sha512:{'9b' * 64}",
            f"streebog256:{'3f' * 32}",
            f"streebog512:{'8e' * 64}",
        ]
    )
    parsed = parse_checksums(value, "UPLOADER_CHECKSUMS")
    assert sorted(parsed) == ["md5", "sha1", "sha256", "sha512", "streebog256", "streebog512"]
    assert parsed["sha1"] == "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"
    assert parse_checksums(f"sha256:{'AB' * 32}", "X") == {"sha256": "ab" * 32}


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (f"sha3:{'a' * 64}", "is not one of md5, sha1, sha256, sha512"),
        (f"sha512:{'a' * 64}", "not 128 hex digits"),
        ("sha256", "is not ALGORITHM:HEX"),
        (f"sha256:{'g' * 64}", "not 64 hex digits"),
        (f"sha256:{'a' * 64},sha256:{'b' * 64}", "two different sha256"),
    ],
)
def test_checksums_the_controller_cannot_have_written(value: str, complaint: str) -> None:
    with pytest.raises(OptionsError, match=complaint):
        parse_checksums(value, "UPLOADER_CHECKSUMS")
