"""Our server, `dvcr-uploader serve`, as a child process, and the API calls an upload or an
import needs (through the project's own API client)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.process import ChildProcess, ServerProcess, free_port
from bench.procstat import status_kib
from uploader.client.api_client import ApiClient, ClientError, phase
from uploader.resources import VIRTUAL_IMAGE

# Variables that change how the server stores data; a run sets them only on purpose.
_FAULT_ENV = ("DVCR_FAULT_SINK_BYTES_PER_SEC",)


def upload_manifest(name: str, storage: str = "PersistentVolumeClaim") -> dict[str, Any]:
    return {
        "apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": "VirtualImage",
        "metadata": {"name": name},
        "spec": {"storage": storage, "dataSource": {"type": "Upload"}},
    }


def http_manifest(name: str, url: str, storage: str = "PersistentVolumeClaim") -> dict[str, Any]:
    return {
        "apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": "VirtualImage",
        "metadata": {"name": name},
        "spec": {"storage": storage, "dataSource": {"type": "HTTP", "http": {"url": url}}},
    }


class OurServer(ServerProcess):
    def __init__(
        self,
        data_dir: Path,
        flags: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        namespace: str = "default",
    ) -> None:
        self.data_dir = data_dir
        self.flags = flags
        self.namespace = namespace
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base_env = {k: v for k, v in os.environ.items() if k not in _FAULT_ENV}
        self.env = {**base_env, **(env or {})}
        self.process: ChildProcess | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("our server is not running")
        return self.process.pid

    def start(self) -> OurServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "uploader.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(self.data_dir),
            *self.flags,
        ]
        log = self.data_dir.parent / f"{self.data_dir.name}.log"
        # Not started in the checkout: `-m` would put the current directory first on the
        # path, and the server's code must come from where PYTHONPATH or the install says.
        self.process = ChildProcess(
            "dvcr-uploader serve", argv, log, env=self.env, cwd=self.data_dir
        )
        self.process.start(self._healthy)
        return self

    def code_location(self) -> str:
        """Where the server's code is imported from, with the same environment."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-c", "import uploader; print(uploader.__file__)"],
            env=self.env,
            cwd=self.data_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        path = Path(proc.stdout.strip())
        return str(path.parent.parent) if proc.returncode == 0 else "?"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                status: int = r.status
                return status == 200
        except OSError:
            return False

    def peak_rss_kib(self) -> int | None:
        """VmHWM: the most memory the server has held since it started."""
        return status_kib(self.pid, "VmHWM")

    def rss_kib(self) -> int | None:
        """VmRSS: the memory the server holds now."""
        return status_kib(self.pid, "VmRSS")

    # -- API ----------------------------------------------------------------------------

    @property
    def api(self) -> ApiClient:
        return ApiClient(self.url, timeout=120)

    def create_upload(
        self, name: str, storage: str = "PersistentVolumeClaim", timeout: float = 30
    ) -> str:
        """Creates an image fed by upload; returns its external upload URL."""
        api = self.api
        api.create(VIRTUAL_IMAGE, self.namespace, upload_manifest(name, storage))
        return api.upload_url(name, timeout, self.namespace)

    def import_http(
        self, name: str, url: str, storage: str = "PersistentVolumeClaim", timeout: float = 3600
    ) -> tuple[float, dict[str, Any]]:
        """Creates an image fed from `url` and follows it with a watch until it is Ready or
        Failed. Returns the seconds from the create request until that event, and the
        object as the event had it."""
        api = self.api
        # The watch is open before the image exists: no event can be missed.
        with api.open_watch(VIRTUAL_IMAGE, self.namespace, name, timeout) as events:
            started = time.perf_counter()
            obj = api.create(VIRTUAL_IMAGE, self.namespace, http_manifest(name, url, storage))
            for event in events:
                obj = event["object"]
                if phase(obj) in ("Ready", "Failed"):
                    return time.perf_counter() - started, obj
        raise ClientError(f"the watch of {name} ended before it was Ready: {obj.get('status')}")

    def delete(self, name: str) -> None:
        """Deletes the image and its data (the server removes the claim directory)."""
        code, obj = self.api.call("DELETE", self.api.path(VIRTUAL_IMAGE, self.namespace, name))
        if code not in (200, 404):
            raise ClientError(f"deleting {name}: {code} {obj}", code)
        claim = self.claim_dir(name)
        if claim.exists():
            shutil.rmtree(claim)

    def claim_dir(self, name: str) -> Path:
        return self.data_dir / "pvc" / self.namespace / f"vi-{name}"
