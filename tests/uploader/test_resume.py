"""Resumable uploads end to end, with real processes only: the server, curl (cut by a
proxy, or killed), tuspy, bare sockets that stall or go silent, a real docker-registry,
SIGKILL, and a filesystem that fills up.

Every resumed upload is compared with an uninterrupted upload of the same file: the same
checksums, size and format, and the same bytes in storage (PVC `disk.img`, or the DVCR
image read back with skopeo)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from diskimages import MiB, qemu_convert, sha256_file, write_disk_image
from dvcrimage import check_image, skopeo_copy
from flakyhttp import RequestCuttingProxy
from registryproc import Registry
from serverproc import Server, background_upload, manifest
from smallfs import small_filesystem
from tusclient import client as tus
from tusclient.exceptions import TusCommunicationError, TusUploadFailed
from waiting import wait_until

PVC = "PersistentVolumeClaim"
DVCR = "ContainerRegistry"
KiB = 1 << 10


# -- clients ------------------------------------------------------------------------------


@dataclass
class Answer:
    rc: int  # curl's exit code (0: an answer arrived)
    code: int  # the HTTP status, 0 when none arrived
    headers: dict[str, str]  # of the final answer, names in lower case
    body: dict[str, Any]


def _last_head(text: str) -> dict[str, str]:
    """The headers of the last answer in a `curl -D` dump (after any 100 Continue)."""
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b.startswith("HTTP/")]
    headers: dict[str, str] = {}
    if blocks:
        for line in blocks[-1].splitlines()[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return headers


def curl(*args: str, timeout: float = 120) -> Answer:
    """Runs curl; never raises for an HTTP error or a broken connection."""
    out = subprocess.run(
        ["curl", "-sS", "-D", "/dev/stderr", "-o", "/dev/stdout", "-w", "\n%{http_code}", *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    body, _, code = out.stdout.decode(errors="replace").rpartition("\n")
    parsed: dict[str, Any] = {}
    if body.strip().startswith("{"):
        with contextlib.suppress(ValueError):
            parsed = json.loads(body)
    return Answer(out.returncode, int(code or 0), _last_head(out.stderr.decode("latin-1")), parsed)


def send_from(path: Path, url: str, offset: int, *extra: str) -> Answer:
    """`curl -T FILE URL`, or `curl -C OFFSET -T FILE URL` to continue."""
    resume = ["-C", str(offset)] if offset else []
    return curl(*extra, *resume, "-T", str(path), url)


def head(url: str) -> dict[str, str]:
    answer = curl("-I", url)
    assert answer.code == 200, answer
    return answer.headers


def head_offset(url: str) -> int:
    return int(head(url)["upload-offset"])


class RawUpload:
    """A client on a bare socket: sends a PUT's head and as much of the body as the test
    says, then stalls, goes silent or closes, and reads whatever answer comes."""

    def __init__(self, url: str, total: int, headers: dict[str, str] | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        lines = [
            f"PUT {parts.path} HTTP/1.1",
            f"Host: {parts.netloc}",
            f"Content-Length: {total}",
            "Content-Type: application/octet-stream",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.sent = 0
        self.last_send = time.monotonic()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)
        self.last_send = time.monotonic()

    def answer(self, timeout: float) -> tuple[int, dict[str, str], dict[str, Any]]:
        """The status, headers and JSON body of the server's answer."""
        self.sock.settimeout(timeout)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"the connection closed without an answer: {data!r}")
            data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = json.loads(rest) if rest.strip().startswith(b"{") else {}
        return int(lines[0].split()[1]), headers, body

    def close(self) -> None:
        self.sock.close()


class CuttingProxy:
    """`RequestCuttingProxy` on an event loop of its own, for tests that run curl and
    tuspy as blocking calls. `cut_next(n)` cuts the next request after n bytes of body."""

    def __init__(self, upstream_port: int) -> None:
        self.proxy = RequestCuttingProxy(upstream_port, [])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.__aenter__(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.__aexit__(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def cut_next(self, *after: int) -> None:
        self.proxy.cuts = list(after)

    def url(self, upload_url: str) -> str:
        return self.proxy.url(upload_url)

    @property
    def cut(self) -> int:
        return self.proxy.cut


class TagWatch:
    """Polls a registry's tag list of one repository every 20 ms, for the whole test."""

    def __init__(self, registry: Registry, repo: str) -> None:
        self.url = f"{registry.url}/v2/{repo}/tags/list"
        self.seen: list[tuple[float, tuple[str, ...]]] = []  # (monotonic time, tags) when any
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TagWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            found: tuple[str, ...] = ()
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    found = tuple(json.loads(response.read()).get("tags") or ())
            except urllib.error.HTTPError as exc:
                if exc.code != 404:  # 404: no such repository yet
                    raise
            except OSError:  # the registry is down
                self._stop.wait(0.02)
                continue
            self.polls += 1
            if found:
                self.seen.append((time.monotonic(), found))
            self._stop.wait(0.02)

    def wait_seen(self, timeout: float = 5) -> None:
        """Waits until a tag has been seen (it appears just before the answer)."""
        wait_until(lambda: self.seen, timeout, what="a tag in the registry")

    def first_seen(self) -> float | None:
        return self.seen[0][0] if self.seen else None

    def all_tags(self) -> set[str]:
        return {tag for _, tags in self.seen for tag in tags}


def registry_tags(registry: Registry, repo: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{registry.url}/v2/{repo}/tags/list", timeout=10) as r:
            return json.loads(r.read()).get("tags") or []
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
        return []


def condition(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")


def wait_parked(server: Server, name: str, url: str, timeout: float = 30) -> int:
    """Waits until the upload waits for a request to continue it (the server noticed the
    cut), and its offset holds still; returns the offset."""
    last = [-1]

    def parked_and_still() -> bool:
        if server.get(name)["status"]["phase"] != "WaitForUserUpload":
            return False
        offset = head_offset(url)
        held, last[0] = offset == last[0], offset
        return held

    wait_until(parked_and_still, timeout, interval=0.1, what=f"{name} to wait, its offset still")
    return last[0]


# -- images and storages ------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    path: Path
    size: int
    sha256: str
    md5: str
    raw_sha256: str  # of the raw disk inside (qemu-img convert to raw)


def _image(path: Path, raw_sha256: str) -> Image:
    data = path.read_bytes()
    return Image(
        path,
        len(data),
        hashlib.sha256(data).hexdigest(),
        hashlib.md5(data).hexdigest(),
        raw_sha256,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image]:
    """A 48 MiB raw disk with data, zero runs and holes, and the qcow2 qemu-img makes of it."""
    root = tmp_path_factory.mktemp("resume-images")
    raw = root / "disk.raw"
    write_disk_image(raw, 48 * MiB, seed=71)
    qcow2 = qemu_convert(raw, "qcow2", root / "disk.qcow2")
    back = root / "qcow2-as-raw.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(back)],
        check=True,
        capture_output=True,
    )
    raw_sha256 = sha256_file(raw)
    return {"raw": _image(raw, raw_sha256), "qcow2": _image(qcow2, sha256_file(back))}


@dataclass
class Target:
    """A server and where it stores images: `pvc`, `oci` (the embedded DVCR layout) or
    `registry` (a real docker-registry as DVCR)."""

    kind: str
    server: Server
    registry: Registry | None = None

    @property
    def storage(self) -> str:
        return PVC if self.kind == "pvc" else DVCR

    def tags(self, name: str) -> list[str]:
        repo = f"vi/default/{name}"
        if self.registry is not None:
            return registry_tags(self.registry, repo)
        index = json.loads((self.server.data_dir / "dvcr" / "index.json").read_text())
        refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
        return [ref.rsplit(":", 1)[1] for ref in refs if ref.rsplit(":", 1)[0] == repo]

    def check_stored(self, name: str, image: Image, out: Path) -> dict[str, Any]:
        """Reads the image back from storage and checks its bytes; returns what was read
        (the DVCR manifest and labels, or nothing for PVC)."""
        obj = self.server.get(name)
        if self.kind == "pvc":
            assert sha256_file(self.server.claim_dir(name) / "disk.img") == image.raw_sha256
            return {}
        ref = obj["status"]["target"]["registryURL"]
        if self.kind == "registry":
            copied = skopeo_copy(f"docker://{ref}", out, "--src-tls-verify=false")
        else:
            copied = skopeo_copy(ref, out)
        labels = check_image(out, copied, image.sha256)
        assert self.tags(name) == [obj["metadata"]["uid"]]
        return {"labels": labels, "layer_size": copied["layers"][0]["size"]}


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    kind = request.param
    registry = Registry(tmp_path / "registry").start() if kind == "registry" else None
    args = ("--dvcr", registry.host) if registry else ()
    with Server(tmp_path / "data", *args).start() as server:
        yield Target(kind, server, registry)
        if registry is not None:
            registry.stop()


def upload_whole(target: Target, name: str, image: Image, **spec: Any) -> dict[str, Any]:
    """An uninterrupted upload of the same file, to compare with."""
    target.server.create(manifest(name, storage=target.storage, **spec))
    answer = send_from(image.path, target.server.upload_url(name), 0)
    assert answer.code == 200, answer
    return target.server.get(name)


def assert_same_image(cut: dict[str, Any], whole: dict[str, Any]) -> None:
    for key in ("phase", "checksum", "size", "format", "cdrom", "progress"):
        assert cut["status"][key] == whole["status"][key], key


# -- 1. random cuts ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("target", ["pvc", "oci", "registry"], indirect=True)
def test_random_cuts_end_with_the_same_image(
    target: Target, images: dict[str, Image], fmt: str, tmp_path: Path
) -> None:
    """curl -T cut at random offsets (through a proxy that drops the connection in the
    middle of the body; for PVC first a rate-limited curl killed at a random moment),
    each time continued with HEAD and curl -C."""
    image = images[fmt]
    server = target.server
    rng = random.Random(f"cuts-{target.kind}-{fmt}")
    spec: dict[str, Any] = {"checksum": {"md5": image.md5}} if fmt == "raw" else {}
    server.create(manifest("cut", storage=target.storage, **spec))
    url = server.upload_url("cut")
    offset = 0
    cuts = 0

    if target.kind == "pvc":
        curl_proc = background_upload(image.path, url, "16M")
        # Killed at a random moment: after 0.3-1 s of its 16 MB/s.
        at = min(int(rng.uniform(0.3, 1.0) * 16 * MiB), image.size // 2)
        wait_until(lambda: head_offset(url) >= at, what=f"{at} bytes uploaded")
        curl_proc.kill()
        curl_proc.wait()
        offset = wait_parked(server, "cut", url)
        assert 0 < offset < image.size
        cuts += 1

    # Absolute offsets to cut at, past what the server has. For qcow2 the first one is
    # within 256 KiB of that: among the header and tables at the start of the file when
    # nothing was cut before.
    count = 4 if target.kind == "pvc" else 3
    points: list[int] = []
    low = offset + 1
    for i in range(count):
        high = low + 256 * KiB if fmt == "qcow2" and i == 0 else image.size - (count - i) * MiB
        points.append(rng.randrange(low, max(high, low + 1)))
        low = points[-1] + 1
    with CuttingProxy(server.port) as proxy:
        for point in points:
            proxy.cut_next(point - offset)
            answer = send_from(image.path, proxy.url(url), offset)
            assert answer.rc != 0 and answer.code != 200, answer
            before, offset = offset, wait_parked(server, "cut", url)
            assert before <= offset <= point, (before, offset, point)
            cuts += 1
            message = condition(server.get("cut"))["message"]
            if offset:
                assert f"stopped at byte {offset}" in message, message
                assert "continue it" in message, message
            length = head(url).get("upload-length")
            if offset and target.storage == DVCR:
                assert length == str(image.size)
        assert proxy.cut == len(points)

    answer = send_from(image.path, url, offset)
    assert answer.code == 200, answer
    assert answer.body["phase"] == "Ready"
    assert answer.body["checksum"]["sha256"] == image.sha256
    assert answer.body["offset"] == image.size
    assert cuts == count + (target.kind == "pvc")

    cut = server.get("cut")
    expected = {"sha256": image.sha256, **({"md5": image.md5} if fmt == "raw" else {})}
    assert cut["status"]["checksum"] == expected
    assert cut["status"]["format"] == fmt
    whole = upload_whole(target, "whole", image, **spec)
    assert_same_image(cut, whole)
    read_cut = target.check_stored("cut", image, tmp_path / "copy-cut")
    read_whole = target.check_stored("whole", image, tmp_path / "copy-whole")
    assert read_cut == read_whole
    if read_cut:
        assert int(cut["status"]["size"]["storedBytes"]) == read_cut["layer_size"]


# -- 2. tus ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fmt"), [("pvc", "qcow2"), ("oci", "raw")], ids=["pvc-qcow2", "oci-raw"]
)
def test_tus_client_continues_after_a_cut(
    server: Server, images: dict[str, Image], tmp_path: Path, kind: str, fmt: str
) -> None:
    image = images[fmt]
    target = Target(kind, server)
    server.create(manifest("tus", storage=target.storage))
    url = server.upload_url("tus")
    headers = {"Upload-Length": str(image.size)}  # the server needs the length up front
    tus_client = tus.TusClient(server.url + "/upload/", headers=headers)
    chunk = 4 * MiB

    with CuttingProxy(server.port) as proxy:
        # Three whole PATCHes, then the fourth is cut in the middle of its body.
        proxy.cut_next(2 * chunk, 2 * chunk, 2 * chunk, MiB + 4321)
        uploader = tus_client.uploader(
            file_path=str(image.path), url=proxy.url(url), chunk_size=chunk
        )
        assert uploader.offset == 0
        for n in range(1, 4):
            uploader.upload_chunk()
            assert uploader.offset == n * chunk
            assert head_offset(url) == n * chunk
        # Between parts the upload simply goes on: a part that ended is no interruption.
        assert server.get("tus")["status"]["phase"] == "Provisioning"
        with pytest.raises((TusUploadFailed, TusCommunicationError)):
            uploader.upload_chunk()
        assert proxy.cut == 1

    offset = wait_parked(server, "tus", url)
    assert 3 * chunk <= offset <= 3 * chunk + MiB + 4321
    # A new uploader (as after a crash of the client) finds the offset with HEAD.
    resumed = tus_client.uploader(file_path=str(image.path), url=url, chunk_size=chunk)
    assert resumed.offset == offset
    resumed.upload()
    assert resumed.offset == image.size
    assert resumed.request is not None
    last_code = resumed.request.status_code

    obj = server.get("tus")
    assert obj["status"]["phase"] == "Ready", (
        f"the last PATCH was answered {last_code}; the image is {obj['status']['phase']}: "
        f"{condition(obj)['message']}"
    )
    assert last_code == 200
    assert obj["status"]["checksum"] == {"sha256": image.sha256}
    whole = upload_whole(target, "whole", image)
    assert_same_image(obj, whole)
    assert target.check_stored("tus", image, tmp_path / "c1") == target.check_stored(
        "whole", image, tmp_path / "c2"
    )


TUS_PATCH = ["-X", "PATCH", "-H", "Tus-Resumable: 1.0.0"]
TUS_PATCH += ["-H", "Content-Type: application/offset+octet-stream"]


def test_tus_patch_at_the_wrong_offset_is_409(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 12 * MiB, seed=72)
    data = image.read_bytes()
    server.create(manifest("tus"))
    url = server.upload_url("tus")
    first = tmp_path / "first"
    first.write_bytes(data[: 5 * MiB])
    answer = curl(*TUS_PATCH, "-H", "Upload-Offset: 0", "--data-binary", f"@{first}", url)
    assert answer.code == 400 and "Upload-Length" in answer.body["message"], answer
    length = ["-H", f"Upload-Length: {12 * MiB}"]
    answer = curl(*TUS_PATCH, *length, "-H", "Upload-Offset: 0", "--data-binary", f"@{first}", url)
    assert answer.code == 204, answer
    assert answer.headers["upload-offset"] == str(5 * MiB)

    rest = tmp_path / "rest"
    rest.write_bytes(data[5 * MiB :])
    for wrong in (0, 5 * MiB - 1, 5 * MiB + 1, 12 * MiB):
        answer = curl(*TUS_PATCH, "-H", f"Upload-Offset: {wrong}", "--data-binary", f"@{rest}", url)
        assert answer.code == 409, (wrong, answer)
        assert answer.headers["upload-offset"] == str(5 * MiB)
        assert answer.headers.get("tus-resumable") == "1.0.0"
    # The same for Content-Range: 416 and the offset.
    answer = curl("-C", str(4 * MiB), "-T", str(image), url)
    assert answer.code == 416, answer
    assert answer.headers["upload-offset"] == str(5 * MiB)
    assert head_offset(url) == 5 * MiB

    # The last part completes the image (its Upload-Length agrees with the first).
    answer = curl(
        *TUS_PATCH,
        "-H", f"Upload-Offset: {5 * MiB}",
        "-H", f"Upload-Length: {12 * MiB}",
        "--data-binary", f"@{rest}",
        url,
    )  # fmt: skip
    assert answer.code == 200, answer
    assert answer.headers["upload-offset"] == str(12 * MiB)
    assert answer.body["phase"] == "Ready"
    assert answer.body["checksum"]["sha256"] == sha256
    assert sha256_file(server.claim_dir("tus") / "disk.img") == sha256


# -- 3. takeover and 409 ------------------------------------------------------------------


def test_a_stalled_request_is_taken_over(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 24 * MiB, seed=73)
    data = image.read_bytes()
    server.create(manifest("stall"))
    url = server.upload_url("stall")
    stalled = RawUpload(url, len(data))
    try:
        sent = 5 * MiB + 12345
        stalled.send(data[:sent])
        # It keeps the connection open and sends nothing more. For a while it keeps its
        # place: a newcomer at the right offset gets 409.
        wait_until(lambda: head_offset(url) == sent, what=f"{sent} bytes taken")
        time.sleep(max(0.0, stalled.last_send + 0.5 - time.monotonic()))  # 0.5 s of silence
        assert head_offset(url) == sent
        assert server.get("stall")["status"]["phase"] == "Provisioning"
        early = send_from(image, url, sent)
        assert early.code == 409, early
        assert early.headers["upload-offset"] == str(sent)
        # After 2 s of silence a request that continues takes over; the silence is the point.
        time.sleep(max(0.0, stalled.last_send + 2.5 - time.monotonic()))
        answer = send_from(image, url, sent)
        assert answer.code == 200, answer
        assert answer.body["checksum"]["sha256"] == sha256
        status, _, body = stalled.answer(timeout=10)
        assert status == 409, (status, body)
        assert "newer request" in body["message"]
    finally:
        stalled.close()
    obj = server.get("stall")
    assert obj["status"]["phase"] == "Ready"
    assert obj["status"]["checksum"]["sha256"] == sha256
    assert sha256_file(server.claim_dir("stall") / "disk.img") == sha256


def test_a_streaming_request_keeps_its_place(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 16 * MiB, seed=74)
    server.create(manifest("busy"))
    url = server.upload_url("busy")
    streaming = background_upload(image, url, "4M")
    try:
        wait_until(lambda: head_offset(url) >= MiB, what="1 MiB uploaded")
        continued = send_from(image, url, head_offset(url))
        assert continued.code == 409, continued
        assert "in progress" in continued.body["message"]
        tus_answer = curl(
            *TUS_PATCH, "-H", f"Upload-Offset: {head_offset(url)}", "--data-binary", "xyz", url
        )
        assert tus_answer.code == 409, tus_answer
        again = send_from(image, url, 0)
        assert again.code == 409, again
        assert streaming.communicate(timeout=60)[0] == b"200"
    finally:
        if streaming.poll() is None:
            streaming.kill()
            streaming.wait()
    obj = server.get("busy")
    assert obj["status"]["checksum"]["sha256"] == sha256
    assert sha256_file(server.claim_dir("busy") / "disk.img") == sha256


def test_a_plain_put_starts_a_parked_upload_over(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 16 * MiB, seed=81)
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(6 * MiB))
    server.create(manifest("over"))
    url = server.upload_url("over")
    cut = RawUpload(url, 6 * MiB)
    cut.send(other.read_bytes()[: 3 * MiB])
    cut.close()
    assert wait_parked(server, "over", url) > 0
    # A whole image from byte 0: what the parked upload took is dropped, not prepended.
    answer = send_from(image, url, 0)
    assert answer.code == 200, answer
    assert answer.body["offset"] == 16 * MiB
    assert answer.body["checksum"]["sha256"] == sha256
    assert sha256_file(server.claim_dir("over") / "disk.img") == sha256


# -- 4. grace, idle, a parked registry upload ---------------------------------------------


def test_a_cut_upload_left_past_the_grace_starts_over(tmp_path: Path) -> None:
    with Server(tmp_path / "data", "--upload-grace", "3s").start() as server:
        image = tmp_path / "disk.raw"
        sha256, _ = write_disk_image(image, 16 * MiB, seed=75)
        data = image.read_bytes()
        server.create(manifest("grace"))
        url = server.upload_url("grace")
        cut = RawUpload(url, len(data))
        cut.send(data[: 4 * MiB])
        cut.close()
        # What the server had taken when the connection closed (it may drop what was
        # still in its receive buffer; the client sends that again).
        offset = wait_parked(server, "grace", url)
        assert 0 < offset <= 4 * MiB
        time.sleep(1)  # a second of the grace time goes by: the upload keeps its offset
        assert head_offset(url) == offset  # still within the grace time

        wait_until(lambda: head_offset(url) == 0, timeout=4, what="the grace time to end")
        obj = server.get("grace")
        assert obj["status"]["phase"] == "WaitForUserUpload"
        assert "continue it" not in condition(obj)["message"]
        late = send_from(image, url, offset)
        assert late.code == 416, late
        assert late.headers["upload-offset"] == "0"
        answer = send_from(image, url, 0)
        assert answer.code == 200, answer
        assert answer.body["checksum"]["sha256"] == sha256
        assert sha256_file(server.claim_dir("grace") / "disk.img") == sha256


def test_a_silent_request_is_cut_with_408_and_stays_resumable(tmp_path: Path) -> None:
    with Server(tmp_path / "data", "--upload-idle-timeout", "2s").start() as server:
        image = tmp_path / "disk.raw"
        sha256, _ = write_disk_image(image, 16 * MiB, seed=76)
        data = image.read_bytes()
        server.create(manifest("idle"))
        url = server.upload_url("idle")
        silent = RawUpload(url, len(data))
        try:
            silent.send(data[: 3 * MiB + 777])
            status, headers, body = silent.answer(timeout=15)
            waited = time.monotonic() - silent.last_send
        finally:
            silent.close()
        assert status == 408, body
        assert 1.5 <= waited <= 8, waited
        assert headers["upload-offset"] == str(3 * MiB + 777)
        assert headers.get("connection", "").lower() == "close"
        assert wait_parked(server, "idle", url) == 3 * MiB + 777
        assert "(idle)" in condition(server.get("idle"))["message"]

        answer = send_from(image, url, 3 * MiB + 777)
        assert answer.code == 200, answer
        assert answer.body["checksum"]["sha256"] == sha256
        assert sha256_file(server.claim_dir("idle") / "disk.img") == sha256


@pytest.mark.parametrize("target", ["registry"], indirect=True)
def test_a_registry_upload_parked_for_10_s_resumes(
    target: Target, images: dict[str, Image], tmp_path: Path
) -> None:
    assert target.registry is not None
    image = images["raw"]
    server = target.server
    server.create(manifest("parked", storage=DVCR))
    url = server.upload_url("parked")
    with TagWatch(target.registry, "vi/default/parked") as watch:
        cut = RawUpload(url, image.size)
        with open(image.path, "rb") as f:
            cut.send(f.read(10 * MiB + 99))
        cut.close()
        assert wait_parked(server, "parked", url) == 10 * MiB + 99
        time.sleep(10)  # parked for 10 s is what this tests: nothing changes meanwhile
        headers = head(url)
        assert headers["upload-offset"] == str(10 * MiB + 99)
        assert headers["upload-length"] == str(image.size)
        started = time.monotonic()
        answer = send_from(image.path, url, 10 * MiB + 99)
        assert answer.code == 200, answer
        watch.wait_seen()
    first = watch.first_seen()
    assert first is not None and first >= started
    assert watch.all_tags() == {server.get("parked")["metadata"]["uid"]}
    target.check_stored("parked", image, tmp_path / "copy")
    assert server.get("parked")["status"]["checksum"] == {"sha256": image.sha256}
    assert target.registry.upload_data("vi/default/parked") == []


# -- 5. nobody uploads ----------------------------------------------------------------------


def test_an_image_nobody_uploads_to_fails_after_the_wait_timeout(tmp_path: Path) -> None:
    with Server(tmp_path / "data", "--wait-for-upload-timeout", "2s").start() as server:
        image = tmp_path / "disk.raw"
        sha256, _ = write_disk_image(image, 16 * MiB, seed=77)
        server.create(manifest("forgotten"))
        url = server.upload_url("forgotten")
        server.create(manifest("slow"))
        slow = background_upload(image, server.upload_url("slow"), "4M")  # about 4 s
        started = time.monotonic()
        obj = server.wait_phase("forgotten", ("Failed",), timeout=35)
        assert time.monotonic() - started < 35
        assert condition(obj)["reason"] == "WaitForUserUploadTimeout"
        assert curl("-I", url).code == 410
        answer = send_from(image, url, 0)
        assert (answer.code, answer.body["reason"]) == (410, "WaitForUserUploadTimeout")
        # An upload that runs longer than the timeout is not failed by it.
        assert slow.communicate(timeout=60)[0] == b"200"
        obj = server.get("slow")
        assert obj["status"]["phase"] == "Ready"
        assert obj["status"]["checksum"]["sha256"] == sha256


# -- 6. SIGKILL mid-upload ------------------------------------------------------------------


def kill_mid_upload(server: Server, name: str, image: Path) -> int:
    """Starts a slow curl -T, SIGKILLs the server once some data is in, restarts it;
    returns the offset the server had before it was killed. The kill comes long before
    the first checkpoint of a PVC upload (every 256 MiB by default), so the upload has
    nothing to continue from (continuing from a checkpoint is not what this tests)."""
    url = server.upload_url(name)
    curl_proc = background_upload(image, url, "8M")
    try:
        wait_until(lambda: head_offset(url) >= 4 * MiB, timeout=20, what="4 MiB uploaded")
        offset = head_offset(url)
        server.stop(signal.SIGKILL)
        assert curl_proc.communicate(timeout=30)[0] != b"200"
    finally:
        if curl_proc.poll() is None:
            curl_proc.kill()
            curl_proc.wait()
    server.start()
    return offset


def assert_starts_over(server: Server, name: str, image: Path, had: int) -> None:
    url = server.get(name)["status"]["imageUploadURLs"]["external"]
    assert head_offset(url) == 0
    assert server.get(name)["status"]["phase"] == "WaitForUserUpload"
    late = send_from(image, url, had)
    assert late.code == 416, late
    assert late.headers["upload-offset"] == "0"


def test_sigkill_mid_upload_then_a_full_upload_pvc(tmp_path: Path) -> None:
    with Server(tmp_path / "data").start() as server:
        image = tmp_path / "disk.raw"
        sha256, _ = write_disk_image(image, 32 * MiB, seed=78)
        server.create(manifest("killed"))
        had = kill_mid_upload(server, "killed", image)
        assert_starts_over(server, "killed", image, had)
        claim = server.claim_dir("killed")
        assert not claim.exists() or list(claim.iterdir()) == []
        answer = send_from(image, server.upload_url("killed"), 0)
        assert answer.code == 200, answer
        assert answer.body["checksum"]["sha256"] == sha256
        assert sha256_file(claim / "disk.img") == sha256
        assert [p.name for p in claim.iterdir()] == ["disk.img"]


@pytest.mark.parametrize("target", ["registry"], indirect=True)
def test_sigkill_mid_upload_then_a_full_upload_registry(
    target: Target, images: dict[str, Image], tmp_path: Path
) -> None:
    assert target.registry is not None
    image = images["qcow2"]
    server = target.server
    server.create(manifest("killed", storage=DVCR))
    with TagWatch(target.registry, "vi/default/killed") as watch:
        had = kill_mid_upload(server, "killed", image.path)
        assert_starts_over(server, "killed", image.path, had)
        started = time.monotonic()
        answer = send_from(image.path, server.upload_url("killed"), 0)
        assert answer.code == 200, answer
        watch.wait_seen()
    assert watch.polls > 50
    first = watch.first_seen()
    assert first is not None and first >= started, "a tag appeared before the image was Ready"
    assert watch.all_tags() == {server.get("killed")["metadata"]["uid"]}
    target.check_stored("killed", image, tmp_path / "copy")


# -- 7. the registry dies mid-push ---------------------------------------------------------


@pytest.mark.parametrize("target", ["registry"], indirect=True)
def test_registry_killed_mid_push_never_leaves_a_partial_tag(
    target: Target, images: dict[str, Image], tmp_path: Path
) -> None:
    registry = target.registry
    assert registry is not None
    image = images["raw"]
    server = target.server
    server.create(manifest("pushed", storage=DVCR))
    url = server.upload_url("pushed")
    with TagWatch(registry, "vi/default/pushed") as watch:
        curl_proc = background_upload(image.path, url, "8M")
        try:
            wait_until(lambda: head_offset(url) >= 8 * MiB, timeout=20, what="8 MiB uploaded")
            registry.kill()
            time.sleep(1)  # the registry stays down a while, as one that restarts does
            registry.start()  # the same port and storage
            first_answer = curl_proc.communicate(timeout=60)[0]
        finally:
            if curl_proc.poll() is None:
                curl_proc.kill()
                curl_proc.wait()
        obj = server.wait_phase("pushed", ("Ready", "Failed", "WaitForUserUpload"), timeout=60)
        if obj["status"]["phase"] == "WaitForUserUpload":
            # Parked with what it took: the client continues once the registry is back.
            answer = send_from(image.path, url, wait_parked(server, "pushed", url))
            assert answer.code == 200, answer
            obj = server.get("pushed")
        if obj["status"]["phase"] == "Ready":
            watch.wait_seen()
    phase = obj["status"]["phase"]
    assert phase in ("Ready", "Failed"), obj["status"]
    if phase == "Failed":
        assert first_answer != b"200"
        message = condition(obj)["message"]
        assert registry.host in message or "registry" in message.lower(), message
        assert watch.all_tags() == set()
        assert registry_tags(registry, "vi/default/pushed") == []
    else:
        assert watch.all_tags() == {obj["metadata"]["uid"]}
        assert obj["status"]["checksum"] == {"sha256": image.sha256}
    for tag in registry_tags(registry, "vi/default/pushed"):
        out = tmp_path / f"copy-{tag}"
        copied = skopeo_copy(
            f"docker://{registry.host}/vi/default/pushed:{tag}", out, "--src-tls-verify=false"
        )
        check_image(out, copied, image.sha256)


# -- 8. a full disk -------------------------------------------------------------------------


def test_a_full_disk_fails_the_upload_and_nothing_else(tmp_path: Path) -> None:
    with (
        small_filesystem(tmp_path / "small", 64 * MiB) as data_dir,
        Server(data_dir).start() as server,
    ):
        before = tmp_path / "before.raw"
        sha_before, _ = write_disk_image(before, 8 * MiB, seed=79)
        server.create(manifest("before"))
        assert send_from(before, server.upload_url("before"), 0).code == 200
        free_before = shutil.disk_usage(data_dir).free

        big = tmp_path / "big.raw"
        big.write_bytes(os.urandom(96 * MiB))
        server.create(manifest("big"))
        answer = send_from(big, server.upload_url("big"), 0)
        obj = server.wait_phase("big", ("Failed",), timeout=30)
        assert answer.code == 507, answer
        assert "full" in answer.body["message"], answer
        assert "full" in condition(obj)["message"], obj["status"]

        assert curl(server.url + "/healthz").code == 200
        kept = server.get("before")
        assert kept["status"]["phase"] == "Ready"
        assert sha256_file(server.claim_dir("before") / "disk.img") == sha_before
        # The failed image's data is gone, so there is room again.
        assert shutil.disk_usage(data_dir).free >= free_before - MiB
        after = tmp_path / "after.raw"
        sha_after, _ = write_disk_image(after, 8 * MiB, seed=80)
        server.create(manifest("after"))
        answer = send_from(after, server.upload_url("after"), 0)
        assert answer.code == 200, answer
        assert server.get("after")["status"]["checksum"]["sha256"] == sha_after
        assert sha256_file(server.claim_dir("after") / "disk.img") == sha_after
