"""Node.js clients for the tests: tus-js-client (what Uppy uploads with), installed by npm
into a cache outside the repository (`~/.cache/dvcr-tests/tus-js`, or
`$DVCR_TESTS_CACHE/tus-js`), and a runner for tests/tus-js/upload.js, which uploads one
file with it and reports every request and answer."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TUS_JS = Path(__file__).parent / "tus-js"
CACHE = Path(os.environ.get("DVCR_TESTS_CACHE", Path.home() / ".cache" / "dvcr-tests"))


class NodeMissing(Exception):
    """node or npm is not installed, or npm could not install the package."""


def install_tus_js() -> Path:
    """The node_modules directory holding tus-js-client at the version
    tests/tus-js/package.json names; installs it with npm when it is not there yet."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise NodeMissing(
                f"{tool} is not installed; the tus-js-client tests need Node.js and npm "
                "(Debian: apt-get install -y nodejs npm)"
            )
    target = CACHE / "tus-js"
    target.mkdir(parents=True, exist_ok=True)
    wanted = (TUS_JS / "package.json").read_text()
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time, across processes
        manifest = target / "package.json"
        installed = target / "node_modules" / "tus-js-client" / "package.json"
        if manifest.exists() and manifest.read_text() == wanted and installed.exists():
            return target / "node_modules"
        manifest.write_text(wanted)
        out = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=target,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if out.returncode != 0 or not installed.exists():
            manifest.unlink(missing_ok=True)
            raise NodeMissing(
                f"npm install of tus-js-client into {target} failed ({out.returncode}): "
                f"{out.stderr.strip()[-2000:]}"
            )
    return target / "node_modules"


@dataclass
class TusJsRun:
    """What one run of tests/tus-js/upload.js did: its events, in order."""

    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def of(self, event: str, method: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["event"] == event and (method is None or e.get("method") == method)
        ]

    @property
    def outcome(self) -> dict[str, Any]:
        ends = [e for e in self.events if e["event"] in ("success", "aborted", "error")]
        assert ends, f"tus-js-client ended without an outcome ({self.returncode}): {self}"
        return ends[-1]

    def __str__(self) -> str:
        lines = [json.dumps(e) for e in self.events]
        return "\n".join([*lines, self.stderr.strip()])


def run_tus_js(node_modules: Path, timeout: float = 300, **args: Any) -> TusJsRun:
    """Runs tests/tus-js/upload.js with `args` (its options: file, endpoint or uploadUrl,
    chunkSize, deferred, dataDuringCreation, headers, abortAfter)."""
    out = subprocess.run(
        ["node", str(TUS_JS / "upload.js"), json.dumps(args)],
        env={**os.environ, "NODE_PATH": str(node_modules)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return TusJsRun(out.returncode, events, out.stderr)
