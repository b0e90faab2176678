"""`dvcr-uploader` run as Deckhouse's uploader pod: a real process with the environment the
controller gives the uploader container, in a directory of its own."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from diskimages import MiB, qemu_convert, write_disk_image
from serverproc import free_port
from testcerts import KeyPair
from waiting import wait_until

UPLOADER = Path(sys.executable).parent / "dvcr-uploader"
OWNER_UID = "6c3e9b2a-8f41-4d7e-9a55-0f1d2c3b4a59"


def deckhouse_env(
    endpoint: str,
    *,
    insecure_tls: str = "true",
    auth_config: Path | None = None,
    checksums: str = "",
) -> dict[str, str]:
    """What Deckhouse's controller sets on the uploader container (uploader_pod.go and
    service/uploader/factory.go): OWNER_UID, the destination and its TLS setting, the
    checksums when the resource has some, the mounted DVCR auth config."""
    env = {
        "OWNER_UID": OWNER_UID,
        "UPLOADER_DESTINATION_ENDPOINT": endpoint,
        "DESTINATION_INSECURE_TLS": insecure_tls,
    }
    if checksums:
        env["UPLOADER_CHECKSUMS"] = checksums
    if auth_config is not None:
        env["UPLOADER_DESTINATION_AUTH_CONFIG"] = str(auth_config)
    return env


class UploaderPod:
    """The process, its ports, and the directories it may and may not write to."""

    def __init__(self, root: Path, env: dict[str, str], scheme: str = "http") -> None:
        self.root = root
        self.tmpdir = root / "tmp"
        self.cwd = root / "cwd"
        self.home = root / "home"
        for directory in (self.tmpdir, self.cwd, self.home):
            directory.mkdir(parents=True, exist_ok=True)
        self.termination_log = root / "termination-log"
        self.port, self.healthz_port, self.metrics_port = free_port(), free_port(), free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "TMPDIR": str(self.tmpdir),
            "PYTHONDONTWRITEBYTECODE": "1",
            "LISTEN_ADDRESS": "127.0.0.1",
            "LISTEN_PORT": str(self.port),
            "HEALTHZ_PORT": str(self.healthz_port),
            "UPLOADER_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            **env,
        }
        self.log_path = root / "pod.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> UploaderPod:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(UPLOADER),
                    "-v=3",
                    "--termination-message-path",
                    str(self.termination_log),
                ],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self.healthy, timeout=20, what=f"the uploader pod: {self.log()}")
        wait_until(self.listening, timeout=20, what=f"the upload listener: {self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.healthz_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as answer:
                return bool(answer.status == 200 and answer.read() == b"OK")
        except OSError:
            return self.proc is not None and self.proc.poll() is not None

    def listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True
        except OSError:
            return self.proc is not None and self.proc.poll() is not None

    def metrics(self) -> str:
        """What Deckhouse's controller scrapes: HTTPS, the certificate not checked."""
        result = subprocess.run(
            ["curl", "-sSk", "--fail", f"https://127.0.0.1:{self.metrics_port}/metrics"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def termination_message(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self.termination_log.read_text())
        return message

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> UploaderPod:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_client_cert(ca: KeyPair, common_name: str) -> KeyPair:
    """A client certificate (clientAuth) for `common_name`, signed by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return KeyPair(key, certificate)


def small_qcow2(directory: Path, mib: int, seed: int) -> Path:
    """A real qcow2 (qemu-img) of `mib` MiB of seeded data, in `directory`."""
    raw = directory / "disk.raw"
    write_disk_image(raw, mib * MiB, seed=seed)
    return qemu_convert(raw, "qcow2", directory / "disk.qcow2")
