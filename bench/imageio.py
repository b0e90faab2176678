"""ovirt-imageio's daemon as the baseline for "HTTP PUT into a disk file": what oVirt runs
on its hosts to take image uploads.

It comes from PyPI (`ovirt-imageio`, which builds a small C extension) into a virtual
environment the harness makes once and keeps in the user's cache directory. When that
cannot be done (no network, no compiler), `install` says why and the scenarios leave the
imageio rows out.

The daemon runs on loopback without TLS, as root without dropping privileges, with its
configuration, run directory and log under its prefix in the run's directory. An upload
is a ticket added through the control port (`PUT /tickets/ID`, naming the target file),
then `PUT /images/ID` with the data on the remote port. The file backend opens the target
with O_DIRECT, so it must exist with its size; the daemon flushes it before it answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from bench.process import ChildProcess, ServerProcess, free_port, port_open

VERSION = "2.5.1"

CONFIG = """\
[daemon]
drop_privileges = false
systemd_enable = false
run_dir = {prefix}/run

[tls]
enable = false

[remote]
host = 127.0.0.1
port = {remote_port}

[local]
enable = false

[control]
transport = tcp
port = {control_port}

[logger_root]
level = WARNING

[handler_logfile]
args = ("{prefix}/daemon.log",)
"""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dvcr-bench"


def venv_dir() -> Path:
    return cache_dir() / f"imageio-{VERSION}-venv"


class Unavailable(RuntimeError):
    """The daemon cannot be installed here; the message says why."""


def install() -> Path:
    """The daemon's program, installed into the cached virtual environment if it is not
    there yet. A marker written last tells a complete environment from one whose install
    failed or was interrupted; such a one is made anew."""
    venv = venv_dir()
    program, done = venv / "bin" / "ovirt-imageio", venv / "installed"
    if done.exists():
        return program
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing ovirt-imageio {VERSION} into {venv}", file=sys.stderr, flush=True)
    steps = (
        [sys.executable, "-m", "venv", str(venv)],
        [
            str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
            "--disable-pip-version-check", f"ovirt-imageio=={VERSION}",
        ],
    )  # fmt: skip
    try:
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=600, check=False)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise Unavailable(f"{' '.join(step[:5])} failed: {' / '.join(tail)}")
        if not program.exists():
            raise Unavailable(f"the install made no {program}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        raise Unavailable(str(exc)) from None
    except Unavailable:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    done.write_text(f"ovirt-imageio {VERSION}\n")
    return program


class ImageioDaemon(ServerProcess):
    """One `ovirt-imageio` daemon on two loopback ports (data and control)."""

    def __init__(self, program: Path, prefix: Path) -> None:
        self.program = program
        self.prefix = prefix
        self.remote_port = free_port()
        self.control_port = free_port()
        self.process: ChildProcess | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("ovirt-imageio is not running")
        return self.process.pid

    def start(self) -> ImageioDaemon:
        (self.prefix / "conf" / "conf.d").mkdir(parents=True, exist_ok=True)
        (self.prefix / "run").mkdir(exist_ok=True)
        (self.prefix / "conf" / "conf.d" / "daemon.conf").write_text(
            CONFIG.format(
                prefix=self.prefix,
                remote_port=self.remote_port,
                control_port=self.control_port,
            )
        )
        argv = [str(self.program), "--conf-dir", str(self.prefix / "conf")]
        self.process = ChildProcess("ovirt-imageio", argv, self.prefix / "daemon.out")
        self.process.start(lambda: port_open(self.remote_port) and port_open(self.control_port))
        return self

    def image_url(self, ticket: str) -> str:
        return f"http://127.0.0.1:{self.remote_port}/images/{ticket}"

    def add_ticket(self, ticket: str, path: Path, size: int) -> None:
        """Allows writing `size` bytes into the existing file `path` at `image_url(ticket)`."""
        body = {
            "uuid": ticket,
            "size": size,
            "url": f"file://{path}",
            "timeout": 3000,
            "ops": ["write"],
        }
        self._control("PUT", ticket, json.dumps(body).encode())

    def remove_ticket(self, ticket: str) -> None:
        self._control("DELETE", ticket)

    def _control(self, method: str, ticket: str, data: bytes | None = None) -> None:
        url = f"http://127.0.0.1:{self.control_port}/tickets/{ticket}"
        request = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60):
                pass
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {url}: {exc.code} {exc.read()[:300]!r}") from None
