"""`dvcr-uploader` as Deckhouse's uploader pod, end to end: the controller's environment, a
real docker-registry as DVCR, real qcow2 images uploaded with curl, the image read back
with skopeo."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from diskimages import MiB, sha256_file
from dvcrimage import check_image, skopeo_copy
from podproc import OWNER_UID, UploaderPod, deckhouse_env, make_client_cert, small_qcow2
from registryproc import Registry
from serverproc import background_upload, curl, head_offset
from testcerts import make_ca, make_server_cert
from waiting import wait_until

REPO = "vi/team-a/ubuntu"
TAG = "0b3c1d52-7a3e-4f2b-9d61-3c8a1e2f4b70"


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    return small_qcow2(tmp_path, 12, seed=11)


def _pod(tmp_path: Path, registry: Registry, **env: object) -> UploaderPod:
    endpoint = f"{registry.host}/{REPO}:{TAG}"
    return UploaderPod(tmp_path / "pod", deckhouse_env(endpoint, **env))  # type: ignore[arg-type]


def _pushed(registry: Registry, out: Path, *creds: str) -> tuple[dict, dict]:
    manifest = skopeo_copy(
        f"docker://{registry.host}/{REPO}:{TAG}", out, "--src-tls-verify=false", *creds
    )
    return manifest, json.loads((out / "manifest.json").read_text())


def _tags(registry: Registry, *auth: str) -> list[str]:
    out = subprocess.run(
        ["curl", "-sS", *auth, f"{registry.url}/v2/{REPO}/tags/list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return list(json.loads(out).get("tags") or [])


def _only_state_under_tmp(pod: UploaderPod) -> None:
    assert list(pod.cwd.iterdir()) == []
    assert list(pod.home.iterdir()) == []


def test_put_upload_pushes_the_image_writes_the_message_and_exits_0(
    tmp_path: Path, registry: Registry, qcow2: Path
) -> None:
    pod = _pod(tmp_path, registry)
    with pod:
        state = [p.name for p in pod.tmpdir.iterdir()]
        assert len(state) == 1 and state[0].startswith("dvcr-uploader-")
        assert curl(f"{pod.url}/upload")[0] == 200  # Deckhouse's readiness GET
        code, answer = curl("-T", str(qcow2), f"{pod.url}/upload")
        assert code == 200, pod.log()
        assert answer["phase"] == "Ready" and answer["format"] == "qcow2"
        assert pod.wait_exit() == 0
    sha256 = sha256_file(qcow2)
    manifest = skopeo_copy(
        f"docker://{registry.host}/{REPO}:{TAG}", tmp_path / "out", "--src-tls-verify=false"
    )
    labels = check_image(tmp_path / "out", manifest, sha256)
    assert labels["source-image-format"] == "qcow2"
    assert labels["source-image-size"] == str(qcow2.stat().st_size)
    assert labels["source-image-virtual-size"] == str(12 * MiB)
    assert labels["checksum-sha256"] == sha256
    message = pod.termination_message()
    assert message["source-image-size"] == qcow2.stat().st_size
    assert message["source-image-virtual-size"] == 12 * MiB
    assert message["source-image-format"] == "qcow2"
    assert message["checksum"] == {"sha256": sha256}
    assert isinstance(message["duration"], int) and message["duration"] > 0
    assert message["average-speed"] > 0
    assert "error-message" not in message
    _only_state_under_tmp(pod)
    assert list(pod.tmpdir.iterdir()) == []  # the state directory goes with the process


def test_cdi_sync_path_and_registry_auth(tmp_path: Path, qcow2: Path) -> None:
    line = subprocess.run(
        ["htpasswd", "-Bbn", "dvcr", "s3cret"], check=True, capture_output=True, text=True
    ).stdout.strip()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(line + "\n")
    registry = Registry(tmp_path / "registry", htpasswd=htpasswd).start()
    try:
        auth = tmp_path / "dvcr-auth" / ".dockerconfigjson"
        auth.parent.mkdir()
        token = "ZHZjcjpzM2NyZXQ="  # base64 of dvcr:s3cret
        auth.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
        with _pod(tmp_path, registry, auth_config=auth) as pod:
            # Deckhouse's uploader serves no async path: neither does the pod.
            for path in ("/v1beta1/upload-async", "/v1alpha1/upload-form-async"):
                post = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"]
                code = subprocess.run(
                    [*post, "--data-binary", "not an image", f"{pod.url}{path}"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                assert code == "404", path
            code, answer = curl(
                "-X", "POST", "--data-binary", f"@{qcow2}", f"{pod.url}/v1beta1/upload"
            )
            assert code == 200, pod.log()
            assert answer["phase"] == "Ready"
            assert pod.wait_exit() == 0
        creds = "--src-creds=dvcr:s3cret"
        manifest, _ = _pushed(registry, tmp_path / "out", creds)
        check_image(tmp_path / "out", manifest, sha256_file(qcow2))
        assert _tags(registry, "-u", "dvcr:s3cret") == [TAG]
    finally:
        registry.stop()


def _drop_after(url_port: int, path: str, data: bytes, total: int) -> None:
    """A PUT that declares `total` bytes, sends `data` and hangs up."""
    with socket.create_connection(("127.0.0.1", url_port)) as sock:
        sock.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {total}\r\n\r\n".encode()
            + data
        )


def test_dropped_put_continues_from_head_offset(
    tmp_path: Path, registry: Registry, qcow2: Path
) -> None:
    data = qcow2.read_bytes()
    with _pod(tmp_path, registry) as pod:
        _drop_after(pod.port, "/upload", data[: 5 * MiB], len(data))

        # Parked once everything that arrived is taken: then HEAD's offset stays put.
        def parked() -> bool:
            state = curl(f"{pod.url}/upload")[1]
            return state.get("phase") == "WaitForUserUpload" and state.get("offset", 0) > 0

        wait_until(parked, timeout=20, what="the upload to wait for the rest")
        offset = head_offset(f"{pod.url}/upload")
        assert isinstance(offset, int) and 0 < offset <= 5 * MiB
        names = ("registry_progress", "registry_average_speed", "registry_current_speed")
        wanted = [f'{name}{{ownerUID="{OWNER_UID}"}}' for name in names]
        wait_until(lambda: all(w in pod.metrics() for w in wanted), timeout=10, what="the gauges")
        assert pod.proc is not None and pod.proc.poll() is None  # the pod waits for the rest
        rest = tmp_path / "rest"
        rest.write_bytes(data[offset:])
        code, answer = curl(
            "-T",
            str(rest),
            "-H",
            f"Content-Range: bytes {offset}-{len(data) - 1}/{len(data)}",
            f"{pod.url}/upload",
        )
        assert code == 200, pod.log()
        assert answer["checksum"]["sha256"] == sha256_file(qcow2)
        assert pod.wait_exit() == 0
    manifest, _ = _pushed(registry, tmp_path / "out")
    check_image(tmp_path / "out", manifest, sha256_file(qcow2))
    _only_state_under_tmp(pod)


def test_a_second_upload_while_one_runs_gets_503(
    tmp_path: Path, registry: Registry, qcow2: Path
) -> None:
    with _pod(tmp_path, registry) as pod:
        slow = background_upload(qcow2, f"{pod.url}/upload", rate="1M")
        try:
            wait_until(lambda: head_offset(f"{pod.url}/upload") > 0, timeout=20, what="bytes")
            code, answer = curl("-T", str(qcow2), f"{pod.url}/upload")
            assert code == 503
            assert answer["reason"] == "ServiceUnavailable"
            code, _ = curl("-X", "POST", "--data-binary", f"@{qcow2}", f"{pod.url}/v1beta1/upload")
            assert code == 503
        finally:
            slow.kill()
            slow.wait()


def test_invalid_qcow2_is_refused_with_422_and_never_tagged(
    tmp_path: Path, registry: Registry, qcow2: Path
) -> None:
    broken = bytearray(qcow2.read_bytes())
    broken[40:48] = (1 << 62).to_bytes(8, "big")  # the L1 table far past the end
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(broken))
    with _pod(tmp_path, registry) as pod:
        code, answer = curl("-T", str(bad), f"{pod.url}/upload")
        assert code == 422, (answer, pod.log())
        assert answer["reason"] == "InvalidImage"
        assert pod.wait_exit() == 0  # a verdict: the controller reads it from the message
    message = pod.termination_message()
    assert message["error-message"].startswith("InvalidImage")
    assert "source-image-size" not in message
    assert _tags(registry) == []


def test_mtls_client_name(tmp_path: Path, registry: Registry, qcow2: Path) -> None:
    ca = make_ca()
    server = make_server_cert(ca)
    files = tmp_path / "certs"
    files.mkdir()
    for name, pem in {
        "ca.crt": ca.cert_pem,
        "tls.crt": server.cert_pem,
        "tls.key": server.key_pem,
    }.items():
        (files / name).write_bytes(pem)
    for common_name in ("dvcr-uploader-proxy", "somebody-else"):
        client = make_client_cert(ca, common_name)
        (files / f"{common_name}.crt").write_bytes(client.cert_pem)
        (files / f"{common_name}.key").write_bytes(client.key_pem)
    env = deckhouse_env(f"{registry.host}/{REPO}:{TAG}")
    env.update(
        TLS_CERT_FILE=str(files / "tls.crt"),
        TLS_KEY_FILE=str(files / "tls.key"),
        CLIENT_CA_FILE=str(files / "ca.crt"),
        CLIENT_NAME="dvcr-uploader-proxy",
        TLS_MIN_VERSION="VersionTLS12",
        TLS_CIPHERS="TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    )

    def client(name: str) -> list[str]:
        return [
            "--cacert",
            str(files / "ca.crt"),
            "--cert",
            str(files / f"{name}.crt"),
            "--key",
            str(files / f"{name}.key"),
        ]

    with UploaderPod(tmp_path / "pod", env, scheme="https") as pod:
        no_cert = subprocess.run(
            ["curl", "-sS", "--cacert", str(files / "ca.crt"), f"{pod.url}/upload"],
            capture_output=True,
        )
        assert no_cert.returncode != 0  # the handshake needs a client certificate
        code, answer = curl(*client("somebody-else"), "-T", str(qcow2), f"{pod.url}/upload")
        assert code == 401
        assert "somebody-else" in answer["message"]
        # Nothing of the refused body was taken.
        head = subprocess.run(
            ["curl", "-sS", "-I", *client("dvcr-uploader-proxy"), f"{pod.url}/upload"],
            capture_output=True,
            text=True,
        ).stdout.lower()
        assert "upload-offset: 0" in head, head
        code, answer = curl(*client("dvcr-uploader-proxy"), "-T", str(qcow2), f"{pod.url}/upload")
        assert code == 200, pod.log()
        assert pod.wait_exit() == 0
    assert _tags(registry) == [TAG]
