from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from nginxproc import Nginx
from registryproc import REGISTRY, Registry
from serverproc import Server

# CI runs the fuzz tests with a fixed seed so a landing never hangs on luck; local runs
# explore new examples each time.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    srv = Nginx(tmp_path / "nginx").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A real docker-registry: anonymous, plain HTTP on loopback, deletes enabled."""
    if not Path(REGISTRY).exists():
        pytest.fail(f"{REGISTRY} is missing: apt-get install -y docker-registry")
    running = Registry(tmp_path / "registry").start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def dvcr_server(tmp_path: Path, registry: Registry) -> Iterator[Server]:
    """Our server with the registry as its DVCR, named host:port as operators do."""
    srv = Server(tmp_path / "data", "--dvcr", registry.host).start()
    try:
        yield srv
    finally:
        srv.stop()
