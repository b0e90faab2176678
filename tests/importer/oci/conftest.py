from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from registryproc import Registry


def _require(binary: str, package: str) -> None:
    if not shutil.which(binary) and not Path(binary).exists():
        pytest.fail(f"{binary} is missing: apt-get install -y {package}")


@pytest.fixture
def htpasswd_file(tmp_path: Path) -> Path:
    """Users alice/wonderland, bcrypt as distribution requires."""
    _require("htpasswd", "apache2-utils")
    line = subprocess.run(
        ["htpasswd", "-Bbn", "alice", "wonderland"], check=True, capture_output=True, text=True
    ).stdout.strip()
    path = tmp_path / "htpasswd"
    path.write_text(line + "\n")
    return path


@pytest.fixture
def htpasswd_registry(tmp_path: Path, htpasswd_file: Path) -> Iterator[Registry]:
    running = Registry(tmp_path / "registry", htpasswd=htpasswd_file).start()
    try:
        yield running
    finally:
        running.stop()
