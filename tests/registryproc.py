"""A real Debian `docker-registry` (distribution 2.8.2) on a loopback port, with a config
written for the test: storage in the test's directory, deletes on, optional auth and TLS."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from serverproc import free_port
from waiting import wait_until

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
HTTP_SECRET = "dvcr-tests-fixed-http-secret"


class Registry:
    def __init__(
        self,
        root: Path,
        *,
        htpasswd: Path | None = None,
        token: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """`token` holds the `auth.token` options (realm, service, issuer, rootcertbundle);
        `tls` is (certificate, key) files."""
        self.root = root
        self.storage = root / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.log_path = root / "registry.log"
        self._htpasswd = htpasswd
        self._token = token
        self._tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        http: dict[str, Any] = {"addr": self.host, "secret": HTTP_SECRET}
        if self._tls:
            http["tls"] = {"certificate": str(self._tls[0]), "key": str(self._tls[1])}
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self._htpasswd:
            config["auth"] = {"htpasswd": {"realm": "dvcr-tests", "path": str(self._htpasswd)}}
        elif self._token:
            config["auth"] = {"token": dict(self._token)}
        return config

    def start(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "config.yml"
        config_path.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [REGISTRY, "serve", str(config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_until(self._listening, timeout=10, what="docker-registry to listen")
        except AssertionError:
            self.stop()
            raise RuntimeError(
                f"docker-registry did not start: {self.log_path.read_text()}"
            ) from None
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """A crash: no chance to answer or close connections cleanly."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    # What the registry keeps on disk (the filesystem driver's layout).
    @property
    def _v2(self) -> Path:
        return self.storage / "docker" / "registry" / "v2"

    def blob_data_files(self, digest: str) -> list[Path]:
        """Every stored copy of the blob's bytes (a mount links, it does not copy)."""
        hex_digest = digest.split(":", 1)[1]
        return [path for path in self._v2.rglob("data") if path.parent.name == hex_digest]

    def layer_link(self, repo: str, digest: str) -> Path:
        algorithm, hex_digest = digest.split(":", 1)
        return self._v2 / "repositories" / repo / "_layers" / algorithm / hex_digest / "link"

    def upload_data(self, repo: str) -> list[Path]:
        """Data files of upload sessions still open. (A cancelled session leaves an empty
        `hashstates` stub behind in 2.8: the handler saves the hash state after deleting.)"""
        uploads = self._v2 / "repositories" / repo / "_uploads"
        return sorted(uploads.glob("*/data")) if uploads.is_dir() else []
