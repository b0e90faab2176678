"""The reference client: real `curl -T` (and `curl -o` for downloads), timed by curl itself."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO


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


def start_put(
    path: Path | None,
    url: str,
    response: Path,
    headers: tuple[str, ...] = (),
    stdin: IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """`curl -sS -o RESPONSE -w '%{http_code} %{time_total}' -T PATH URL`, started; see
    `finish_put`. With `path` None the body is read from `stdin` (`-T -`)."""
    argv = [curl_binary(), "-sS", "-o", str(response), "-w", "%{http_code} %{time_total}"]
    for header in headers:
        argv += ["-H", header]
    argv += ["-T", "-" if path is None else str(path), url]
    return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_put(proc: subprocess.Popen[bytes], url: str, response: Path) -> CurlResult:
    """Waits for a `start_put` upload; the answer's body is read from RESPONSE and removed."""
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise CurlFailed(f"curl -T {url}: {stderr.decode(errors='replace').strip()}")
    code, seconds = stdout.decode().split()
    body = response.read_bytes() if response.exists() else b""
    response.unlink(missing_ok=True)
    return CurlResult(int(code), float(seconds), body)


def put_file(path: Path, url: str, response: Path) -> CurlResult:
    """`curl -sS -o RESPONSE -w '%{http_code} %{time_total}' -T PATH URL`."""
    return finish_put(start_put(path, url, response), url, response)


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
