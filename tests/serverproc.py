"""A real `dvcr-uploader serve` process on a loopback port, with the API calls tests make of
it (through the project's own API client), and curl runs against its upload URLs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from waiting import wait_until

from uploader.client.api_client import ApiClient, ClientError
from uploader.client.credentials import Credentials
from uploader.resources import GROUP, VERSION, VIRTUAL_IMAGE, Kind

API = f"/apis/{GROUP}/{VERSION}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest(name: str, storage: str = "PersistentVolumeClaim", **upload: Any) -> dict[str, Any]:
    source: dict[str, Any] = {"type": "Upload"}
    if upload:
        source["upload"] = upload
    return {
        "apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": "VirtualImage",
        "metadata": {"name": name},
        "spec": {"storage": storage, "dataSource": source},
    }


class Server:
    def __init__(
        self,
        data_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        token: str | None = None,
    ) -> None:
        """`host`: the address to listen on (the tests reach it on 127.0.0.1); `token`: the
        bearer token its API calls send."""
        self.data_dir = data_dir
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.host = host
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uploader.cli",
                "serve",
                "--listen",
                f"{self.host}:{self.port}",
                "--data-dir",
                str(self.data_dir),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        wait_until(self._healthy, timeout=20, interval=0.05, what="the server to answer /healthz")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited: {self.log_path.read_text()}")
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- API ----------------------------------------------------------------------------

    @property
    def api(self) -> ApiClient:
        """A client of this server's API with its token as it is now (tests change both)."""
        return ApiClient(self.url, Credentials(self.token))

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.api.call(method, path, body)

    def images_path(self, namespace: str = "default", name: str | None = None) -> str:
        return self.api.path(VIRTUAL_IMAGE, namespace, name)

    def create(self, doc: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        code, obj = self.call("POST", self.images_path(namespace), doc)
        assert code == 201, obj
        return obj

    def get(self, name: str, namespace: str = "default") -> dict[str, Any]:
        code, obj = self.call("GET", self.images_path(namespace, name))
        assert code == 200, obj
        return obj

    def wait_for(
        self,
        name: str,
        done: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = 60,
        namespace: str = "default",
        kind: Kind = VIRTUAL_IMAGE,
    ) -> dict[str, Any]:
        """The image as soon as `done` holds for it."""
        try:
            return self.api.wait_for(name, done, what, timeout, namespace, kind)
        except ClientError as exc:
            raise AssertionError(exc.message) from None

    def wait_phase(
        self,
        name: str,
        phases: tuple[str, ...],
        timeout: float = 60,
        namespace: str = "default",
        kind: Kind = VIRTUAL_IMAGE,
    ) -> dict[str, Any]:
        try:
            return self.api.wait_for_phase(name, phases, timeout, namespace, kind)
        except ClientError as exc:
            raise AssertionError(exc.message) from None

    def wait_gone(self, name: str, timeout: float = 60, namespace: str = "default") -> None:
        try:
            self.api.wait_gone(name, timeout, namespace)
        except ClientError as exc:
            raise AssertionError(exc.message) from None

    def upload_url(self, name: str, namespace: str = "default") -> str:
        obj = self.wait_phase(name, ("WaitForUserUpload",), namespace=namespace)
        return obj["status"]["imageUploadURLs"]["external"]

    def claim_dir(self, name: str, namespace: str = "default") -> Path:
        return self.data_dir / "pvc" / namespace / f"vi-{name}"

    def peak_rss(self) -> int:
        """VmHWM of the server process, bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def curl_sent(*args: str, stdin: bytes | None = None) -> tuple[int, dict, int]:
    """Runs curl; returns (HTTP code, parsed JSON body, bytes of the body curl sent)."""
    out = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code} %{size_upload}", *args],
        input=stdin,
        capture_output=True,
        check=True,
        timeout=300,
    ).stdout.decode()
    body, _, tail = out.rpartition("\n")
    code, sent = tail.split()
    return int(code), json.loads(body) if body.strip() else {}, int(sent)


def curl(*args: str, stdin: bytes | None = None) -> tuple[int, dict]:
    """Runs curl; returns (HTTP code, parsed JSON body)."""
    code, body, _ = curl_sent(*args, stdin=stdin)
    return code, body


def background_upload(path: Path, url: str, rate: str | None = None) -> subprocess.Popen[bytes]:
    """`curl -T` in the background, optionally slowed to `rate` (curl's --limit-rate);
    its stdout is the HTTP code once it ends."""
    limit = ["--limit-rate", rate] if rate else []
    return subprocess.Popen(
        ["curl", "-sS", *limit, "-o", "/dev/null", "-w", "%{http_code}", "-T", str(path), url],
        stdout=subprocess.PIPE,
    )


def head_offset(url: str) -> int:
    """`Upload-Offset` of the upload URL, as `curl -I` sees it."""
    head = subprocess.run(["curl", "-sS", "-I", url], capture_output=True, text=True).stdout
    for line in head.lower().splitlines():
        if line.startswith("upload-offset:"):
            return int(line.split(":", 1)[1])
    raise AssertionError(head)
