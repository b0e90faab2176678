"""`UPLOADER_CHECKSUMS` as Deckhouse's controller sets it (`algorithm:sum`, sorted,
comma separated): a match pushes the image, a mismatch of any algorithm fails it with
the termination message and no tag, one that cannot be computed here fails at start."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from pathlib import Path

import pytest
from podproc import UploaderPod, deckhouse_env, small_qcow2
from registryproc import Registry
from serverproc import curl

REPO = "vi/team-c/alpine"
TAG = "1e2d3c4b-5a69-4788-9a0b-c1d2e3f40516"


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    return small_qcow2(tmp_path, 6, seed=31)


def _digest(path: Path, algorithm: str) -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def _controller_value(checksums: dict[str, str]) -> str:
    """datasource.FormatChecksums: pairs sorted by algorithm."""
    return ",".join(f"{alg}:{checksums[alg]}" for alg in sorted(checksums))


def _tags(registry: Registry) -> list[str]:
    out = subprocess.run(
        ["curl", "-sS", f"{registry.url}/v2/{REPO}/tags/list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return list(json.loads(out).get("tags") or [])


def _pod(tmp_path: Path, registry: Registry, checksums: dict[str, str]) -> UploaderPod:
    env = deckhouse_env(f"{registry.host}/{REPO}:{TAG}", checksums=_controller_value(checksums))
    return UploaderPod(tmp_path / "pod", env)


def test_every_computable_checksum_matches_and_the_image_is_pushed(
    tmp_path: Path, registry: Registry, qcow2: Path
) -> None:
    wanted = {alg: _digest(qcow2, alg) for alg in ("md5", "sha1", "sha256", "sha512")}
    with _pod(tmp_path, registry, wanted) as pod:
        code, answer = curl("-T", str(qcow2), f"{pod.url}/upload")
        assert code == 200, (answer, pod.log())
        assert answer["checksum"]["sha256"] == wanted["sha256"]
        assert pod.wait_exit() == 0
    message = pod.termination_message()
    assert message["checksum"] == {"sha256": wanted["sha256"], "md5": wanted["md5"]}
    assert _tags(registry) == [TAG]


@pytest.mark.parametrize("wrong", ["sha256", "md5", "sha1", "sha512"])
def test_a_mismatch_fails_the_image_without_a_tag(
    tmp_path: Path, registry: Registry, qcow2: Path, wrong: str
) -> None:
    wanted = {alg: _digest(qcow2, alg) for alg in ("sha256", wrong)}
    wanted[wrong] = hashlib.new(wrong, b"another image").hexdigest()
    with _pod(tmp_path, registry, wanted) as pod:
        code, answer = curl("-T", str(qcow2), f"{pod.url}/upload")
        assert code == 422, (answer, pod.log())
        assert answer["reason"] == "BadImageChecksum"
        # A verdict on the image: the controller reads it from a completed pod.
        assert pod.wait_exit() == 0
    message = pod.termination_message()
    assert set(message) == {"error-message"}
    text = message["error-message"]
    assert text.startswith(f"BadImageChecksum: {wrong} of the received image is "), text
    assert _digest(qcow2, wrong) in text and wanted[wrong] in text
    assert _tags(registry) == []


def test_streebog_cannot_be_checked_here_and_fails_at_start(
    tmp_path: Path, registry: Registry
) -> None:
    pod = _pod(tmp_path, registry, {"sha256": "ab" * 32, "streebog512": "8e" * 64})
    pod.start()
    assert pod.wait_exit(timeout=30) == 0
    text = pod.termination_message()["error-message"]
    assert text.startswith("UnsupportedChecksum: ") and "streebog512" in text, text
    with pytest.raises(ConnectionRefusedError):  # it never took an upload
        socket.create_connection(("127.0.0.1", pod.port), timeout=2).close()
    assert _tags(registry) == []
