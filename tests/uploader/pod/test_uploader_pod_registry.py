"""The pod's destination registry as the controller may configure it: TLS trusted through
`UPLOADER_DESTINATION_CA_BUNDLE`, credentials given directly in
`UPLOADER_DESTINATION_ACCESS_KEY_ID`/`_SECRET_KEY`; and how a push that cannot pass ends."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskimages import sha256_file
from dvcrimage import check_image, skopeo_copy
from podproc import UploaderPod, deckhouse_env, small_qcow2
from registryproc import Registry
from serverproc import curl
from testcerts import KeyPair, make_ca, make_server_cert

REPO = "vi/team-b/debian"
TAG = "9a7c3e21-4b6d-4f80-8e12-7d5c3b1a0f94"
USER, PASSWORD = "dvcr-writer", "c0rrect-horse"


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    return small_qcow2(tmp_path, 8, seed=21)


@pytest.fixture
def ca() -> KeyPair:
    return make_ca()


@pytest.fixture
def tls_registry(tmp_path: Path, ca: KeyPair) -> Iterator[Registry]:
    """docker-registry over HTTPS only, its certificate signed by `ca`, with htpasswd auth."""
    certs = tmp_path / "registry-certs"
    certs.mkdir()
    server = make_server_cert(ca)
    (certs / "tls.crt").write_bytes(server.cert_pem)
    (certs / "tls.key").write_bytes(server.key_pem)
    line = subprocess.run(
        ["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / "htpasswd").write_text(line + "\n")
    running = Registry(
        tmp_path / "registry",
        htpasswd=tmp_path / "htpasswd",
        tls=(certs / "tls.crt", certs / "tls.key"),
    ).start()
    try:
        yield running
    finally:
        running.stop()


def _env(registry: Registry, **extra: str) -> dict[str, str]:
    env = deckhouse_env(f"{registry.host}/{REPO}:{TAG}", insecure_tls="false")
    env.update(UPLOADER_DESTINATION_ACCESS_KEY_ID=USER, UPLOADER_DESTINATION_SECRET_KEY=PASSWORD)
    env.update(extra)
    return env


def _tags(registry: Registry, ca_file: Path) -> list[str]:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(ca_file),
            "-u",
            f"{USER}:{PASSWORD}",
            f"{registry.url}/v2/{REPO}/tags/list",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    answer = json.loads(out)
    assert "errors" not in answer or answer["errors"][0]["code"] == "NAME_UNKNOWN", answer
    return list(answer.get("tags") or [])


def _ca_file(tmp_path: Path, ca: KeyPair) -> Path:
    path = tmp_path / "ca" / "dvcr-ca.crt"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(ca.cert_pem)
    return path


@pytest.mark.parametrize("bundle", ["file", "directory"])
def test_a_tls_registry_trusted_through_the_ca_bundle_and_direct_credentials(
    tmp_path: Path, tls_registry: Registry, ca: KeyPair, qcow2: Path, bundle: str
) -> None:
    ca_file = _ca_file(tmp_path, ca)
    (ca_file.parent / "README").write_text("not a certificate; skipped\n")
    # An auth config with wrong credentials: the direct ones win and it is not read.
    auth = tmp_path / "dvcr-auth" / ".dockerconfigjson"
    auth.parent.mkdir()
    auth.write_text(json.dumps({"auths": {tls_registry.host: {"auth": "bm9ib2R5Om5vcGU="}}}))
    env = _env(
        tls_registry,
        UPLOADER_DESTINATION_CA_BUNDLE=str(ca_file if bundle == "file" else ca_file.parent),
        UPLOADER_DESTINATION_AUTH_CONFIG=str(auth),
    )
    with UploaderPod(tmp_path / "pod", env) as pod:
        code, answer = curl("-T", str(qcow2), f"{pod.url}/upload")
        assert code == 200, (answer, pod.log())
        assert answer["phase"] == "Ready"
        assert pod.wait_exit() == 0
    assert _tags(tls_registry, ca_file) == [TAG]
    manifest = skopeo_copy(
        f"docker://{tls_registry.host}/{REPO}:{TAG}",
        tmp_path / "out",
        f"--src-cert-dir={ca_file.parent}",
        f"--src-creds={USER}:{PASSWORD}",
    )
    check_image(tmp_path / "out", manifest, sha256_file(qcow2))
    assert pod.termination_message()["checksum"] == {"sha256": sha256_file(qcow2)}


def test_a_tls_registry_without_its_ca_fails_the_push_and_exits_1(
    tmp_path: Path, tls_registry: Registry, ca: KeyPair, qcow2: Path
) -> None:
    with UploaderPod(tmp_path / "pod", _env(tls_registry)) as pod:
        code, answer = curl("-T", str(qcow2), f"{pod.url}/upload")
        assert code >= 500, (answer, pod.log())
        assert pod.wait_exit() == 1  # the kubelet starts it again; a fixed CA may pass
    message = pod.termination_message()["error-message"]
    assert "certificate" in message.lower(), message
    assert _tags(tls_registry, _ca_file(tmp_path, ca)) == []


def test_a_wrong_password_fails_the_push_clearly_and_exits_1(
    tmp_path: Path, tls_registry: Registry, ca: KeyPair, qcow2: Path
) -> None:
    ca_file = _ca_file(tmp_path, ca)
    env = _env(
        tls_registry,
        UPLOADER_DESTINATION_CA_BUNDLE=str(ca_file),
        UPLOADER_DESTINATION_SECRET_KEY="not-the-password",
    )
    with UploaderPod(tmp_path / "pod", env) as pod:
        code, answer = curl("-T", str(qcow2), f"{pod.url}/upload")
        assert code >= 500, (answer, pod.log())
        assert pod.wait_exit() == 1
    message = pod.termination_message()
    assert set(message) == {"error-message"}
    text = message["error-message"]
    assert "401" in text or "unauthorized" in text.lower(), text
    assert text.startswith("ProvisioningFailed: ") and "apply the image" not in text, text
    assert "not-the-password" not in text and "not-the-password" not in pod.log()
    assert _tags(tls_registry, ca_file) == []
