"""Debian's docker-registry (distribution 2.8) on a loopback port, for DVCR scenarios."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from bench.process import free_port

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "error"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root / "storage")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host, "secret": "dvcr-bench"},
        }
        path = self.root / "config.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        log = open(self.root / "registry.log", "wb")
        self.process = subprocess.Popen([REGISTRY, "serve", str(path)], stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/v2/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(
            f"the registry did not start: {(self.root / 'registry.log').read_text()}"
        )

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid
