"""The reference client: real `curl -T` (and `curl -o` for downloads), timed by curl itself."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


class CurlFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class CurlResult:
    code: int
    seconds: float  # curl's %{time_total}: from connecting until the response has arrived
    body: bytes


def curl_binary() -> str:
    path = shutil.which("curl")
    if path is None:
        raise SystemExit("curl is not installed (apt-get install -y curl)")
    return path


def put_file(path: Path, url: str, response: Path) -> CurlResult:
    """`curl -sS -o RESPONSE -w '%{http_code} %{time_total}' -T PATH URL`."""
    proc = subprocess.run(
        [
            curl_binary(),
            "-sS",
            "-o",
            str(response),
            "-w",
            "%{http_code} %{time_total}",
            "-T",
            str(path),
            url,
        ],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise CurlFailed(f"curl -T {path} {url}: {proc.stderr.decode(errors='replace').strip()}")
    code, seconds = proc.stdout.decode().split()
    body = response.read_bytes() if response.exists() else b""
    response.unlink(missing_ok=True)
    return CurlResult(int(code), float(seconds), body)


def start_get(url: str, output: Path) -> subprocess.Popen[bytes]:
    """`curl -sS -o OUTPUT -w '%{http_code} %{time_total}' URL`, started; see `finish_get`."""
    argv = [curl_binary(), "-sS", "-o", str(output), "-w", "%{http_code} %{time_total}", url]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_get(proc: subprocess.Popen[bytes], url: str) -> CurlResult:
    """Waits for a `start_get` download; the body is in its output file, not in the result."""
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise CurlFailed(f"curl -o {url}: {stderr.decode(errors='replace').strip()}")
    code, seconds = stdout.decode().split()
    return CurlResult(int(code), float(seconds), b"")
