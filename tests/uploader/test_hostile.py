"""A corpus of hostile requests and manifests against one live server, while an upload runs.

Every entry must get its clear answer (the code and `reason` the README lists under "API");
meanwhile `/healthz` keeps answering, the upload that started first ends Ready with the right
checksum, and the log holds no traceback. The corpus runs in the order written, against
the same server, so one entry's damage would show in the next ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from serverproc import API, Server, curl, manifest

ADMIN = "corpus-admin-token-0123456789"
VIEWER = "corpus-viewer-token-0123456789"
EDITOR = "corpus-editor-token-0123456789"
UPLOAD_SIZE = 1 << 30
UPLOAD_RATE = 64 << 20  # bytes/s: the upload lasts through the corpus
VI = "virtualization.deckhouse.io/v1alpha2"


@dataclass
class Live:
    server: Server
    work: Path
    upload: subprocess.Popen[bytes]
    upload_sha256: str
    healthz_worst: list[float]
    upload_speed: Path  # what curl measured, bytes/s


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    work = tmp_path_factory.mktemp("hostile")
    tokens = work / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {"user": "root", "token": ADMIN, "role": "admin", "namespaces": "*"},
                    {"user": "eve", "token": VIEWER, "role": "view", "namespaces": ["team"]},
                    {"user": "ed", "token": EDITOR, "role": "edit", "namespaces": ["team"]},
                ]
            }
        )
    )
    srv = Server(
        work / "data", "--api-token-file", str(tokens), "--header-timeout", "2", token=ADMIN
    ).start()
    image = work / "big.raw"
    with open(image, "wb") as file:
        block = os.urandom(4 << 20)
        for i in range(UPLOAD_SIZE // len(block)):
            file.write(block[i:] + block[:i])
    srv.create(manifest("running"))
    url = srv.upload_url("running")
    speed = work / "speed"
    upload = subprocess.Popen(
        ["curl", "-sS", "--limit-rate", str(UPLOAD_RATE), "-T", str(image), url,
         "-w", "%{speed_upload}", "-o", str(work / "answer.json")],
        stdout=speed.open("wb"),
    )  # fmt: skip
    worst: list[float] = [0.0]
    stop = threading.Event()

    def watch_health() -> None:
        while not stop.is_set():
            started = time.monotonic()
            code, _ = curl("-o", "/dev/null", "-m", "30", srv.url + "/healthz")
            assert code == 200
            worst[0] = max(worst[0], time.monotonic() - started)
            time.sleep(0.1)  # the pace of the health checks, not a wait for a state

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    try:
        yield Live(srv, work, upload, _sha256(image), worst, speed)
    finally:
        stop.set()
        watcher.join()
        upload.kill()
        srv.stop()


def _call(live: Live, method: str, path: str, body: Any = None, token: str | None = ADMIN):
    live.server.token = token
    try:
        return live.server.call(method, path, body)
    finally:
        live.server.token = ADMIN


def _raw(live: Live, method: str, path: str, data: bytes, token: str | None = ADMIN, **h: str):
    headers = [f"{k.replace('_', '-')}: {v}" for k, v in h.items()]
    if token:
        headers.append(f"Authorization: Bearer {token}")
    args = ["-X", method, "--data-binary", "@-"]
    for header in headers:
        args += ["-H", header]
    return curl(*args, live.server.url + path, stdin=data)


def _vi(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": VI, "kind": "VirtualImage", "metadata": {"name": name}, "spec": spec}


def _http(url: str) -> dict[str, Any]:
    return {"type": "HTTP", "http": {"url": url}}


IMAGES = f"{API}/namespaces/default/virtualimages"
TEAM = f"{API}/namespaces/team/virtualimages"


def _expect(code: int, reason: str) -> Callable[[tuple[int, Any]], None]:
    def check(answer: tuple[int, Any]) -> None:
        got, status = answer
        assert got == code, status
        assert status["kind"] == "Status" and status["reason"] == reason, status
        assert len(json.dumps(status)) < 2000, "an answer must not echo the input at length"

    return check


# Each entry: a name, what to send, what must come back.
Send = Callable[[Live], tuple[int, Any]]
CORPUS: list[tuple[str, Send, Callable[[tuple[int, Any]], None]]] = [
    # -- who may do what
    ("no token", lambda lv: _call(lv, "GET", IMAGES, token=None), _expect(401, "Unauthorized")),
    ("unknown token", lambda lv: _call(lv, "GET", IMAGES, token="x" * 40),
     _expect(401, "Unauthorized")),
    ("viewer creates", lambda lv: _call(lv, "POST", TEAM, manifest("v"), token=VIEWER),
     _expect(403, "Forbidden")),
    ("viewer reads elsewhere", lambda lv: _call(lv, "GET", IMAGES, token=VIEWER),
     _expect(403, "Forbidden")),
    ("editor writes elsewhere", lambda lv: _call(lv, "POST", IMAGES, manifest("e"), token=EDITOR),
     _expect(403, "Forbidden")),
    ("editor deletes the running upload",
     lambda lv: _call(lv, "DELETE", f"{IMAGES}/running", token=EDITOR), _expect(403, "Forbidden")),
    ("editor makes a cluster image",
     lambda lv: _call(lv, "POST", f"{API}/clustervirtualimages",
                      {**_vi("c", dataSource={"type": "Upload"}), "kind": "ClusterVirtualImage"},
                      token=EDITOR),
     _expect(403, "Forbidden")),
    ("metrics by a namespaced token", lambda lv: _call(lv, "GET", "/metrics", token=EDITOR),
     _expect(403, "Forbidden")),
    # -- what HTTP itself refuses
    ("unknown path", lambda lv: _call(lv, "GET", "/admin"), _expect(404, "NotFound")),
    ("wrong method", lambda lv: _call(lv, "PATCH", IMAGES, {}), _expect(405, "MethodNotAllowed")),
    ("body over 1 MiB", lambda lv: _raw(lv, "POST", IMAGES, b"#" * (2 << 20)),
     _expect(413, "RequestEntityTooLarge")),
    ("not UTF-8", lambda lv: _raw(lv, "POST", IMAGES, b"a: \xff\xfe"), _expect(400, "BadRequest")),
    # -- manifests that cost more than they should
    ("alias bomb", lambda lv: _raw(lv, "POST", IMAGES, (
        b'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
        b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n")),
     _expect(400, "BadRequest")),
    ("deep YAML", lambda lv: _raw(lv, "POST", IMAGES, b"a: " + b"[" * 5000),
     _expect(400, "BadRequest")),
    ("deep JSON", lambda lv: _raw(lv, "POST", IMAGES, b"[" * 100_000,
                                  Content_Type="application/json"),
     _expect(400, "BadRequest")),
    ("many nodes", lambda lv: _raw(lv, "POST", IMAGES, b"[" + b"1," * 300_000 + b"1]"),
     _expect(400, "BadRequest")),
    ("two documents", lambda lv: _raw(lv, "POST", IMAGES, b"a: 1\n---\nb: 2\n"),
     _expect(400, "BadRequest")),
    ("empty body", lambda lv: _raw(lv, "POST", IMAGES, b""), _expect(400, "BadRequest")),
    ("a list, not an object", lambda lv: _call(lv, "POST", IMAGES, [1, 2]),
     _expect(422, "Invalid")),
    # -- names, namespaces and paths
    ("name too long for a claim",
     lambda lv: _call(lv, "POST", IMAGES, manifest("n" * 253)), _expect(422, "Invalid")),
    ("name of 100 KB", lambda lv: _call(lv, "POST", IMAGES, manifest("n" * 100_000)),
     _expect(422, "Invalid")),
    ("upper case name", lambda lv: _call(lv, "POST", IMAGES, manifest("Big")),
     _expect(422, "Invalid")),
    ("name is a number",
     lambda lv: _call(lv, "POST", IMAGES, {**manifest("x"), "metadata": {"name": 5}}),
     _expect(422, "Invalid")),
    ("metadata is a list",
     lambda lv: _call(lv, "POST", IMAGES, {**manifest("x"), "metadata": ["x"]}),
     _expect(422, "Invalid")),
    ("namespace in the path", lambda lv: _call(lv, "GET", f"{API}/namespaces/..%2F..%2Ftmp/"
                                               "virtualimages"), _expect(422, "Invalid")),
    ("traversal in the name", lambda lv: _call(lv, "GET", f"{IMAGES}/..%2F..%2Fstate.db"),
     _expect(404, "NotFound")),
    ("namespace mismatch",
     lambda lv: _call(lv, "POST", IMAGES, {**manifest("x"),
                                           "metadata": {"name": "x", "namespace": "other"}}),
     _expect(422, "Invalid")),
    # -- fields of the wrong type
    ("storage is a list", lambda lv: _call(lv, "POST", IMAGES, _vi(
        "x", storage=["PersistentVolumeClaim"], dataSource={"type": "Upload"})),
     _expect(422, "Invalid")),
    ("url is a number", lambda lv: _call(lv, "POST", IMAGES, _vi(
        "x", dataSource={"type": "HTTP", "http": {"url": 5}})), _expect(422, "Invalid")),
    ("checksum is a list", lambda lv: _call(lv, "POST", IMAGES, _vi(
        "x", dataSource={"type": "Upload", "upload": {"checksum": ["a"]}})),
     _expect(422, "Invalid")),
    ("labels hold a number",
     lambda lv: _call(lv, "POST", IMAGES, {**manifest("x"),
                                           "metadata": {"name": "x", "labels": {"a": 1}}}),
     _expect(422, "Invalid")),
    ("objectRef namespace is a number", lambda lv: _call(lv, "POST", IMAGES, _vi(
        "x", dataSource={"type": "ObjectRef",
                         "objectRef": {"kind": "VirtualImage", "name": "y", "namespace": 5}})),
     _expect(422, "Invalid")),
    ("unknown field", lambda lv: _call(lv, "POST", IMAGES, _vi(
        "x", dataSource={"type": "Upload"}, hostPath="/etc")), _expect(422, "Invalid")),
    # -- reaching out of the namespace or the data directory
    ("objectRef into a directory", lambda lv: _call(lv, "POST", IMAGES, _vi(
        "x", dataSource={"type": "ObjectRef", "objectRef": {
            "kind": "VirtualDisk", "name": "x", "namespace": "/tmp/outside"}})),
     _expect(422, "Invalid")),
    ("objectRef into another namespace", lambda lv: _call(lv, "POST", IMAGES, _vi(
        "x", dataSource={"type": "ObjectRef", "objectRef": {
            "kind": "VirtualImage", "name": "running", "namespace": "team"}})),
     _expect(422, "Invalid")),
    ("pull secret of another namespace", lambda lv: _call(lv, "POST", IMAGES, _vi(
        "x", dataSource={"type": "ContainerImage", "containerImage": {
            "image": "registry.example/x:1",
            "imagePullSecret": {"name": "creds", "namespace": "team"}}})),
     _expect(422, "Invalid")),
    # -- upload URLs
    ("wrong upload token", lambda lv: _raw(lv, "PUT", "/upload/" + "A" * 43, b"x", token=None),
     _expect(404, "NotFound")),
    ("Content-Range total of 1e23", lambda lv: _raw(
        lv, "PUT", _upload_path(lv, "huge"), b"x", token=None,
        Content_Range="bytes 0-0/100000000000000000000000"), _expect(413, "ImageTooLarge")),
    ("Upload-Length of 1e18", lambda lv: _raw(
        lv, "PATCH", _upload_path(lv, "huge-tus"), b"x", token=None, Upload_Offset="0",
        Upload_Length="1000000000000000000", Content_Type="application/offset+octet-stream",
        Tus_Resumable="1.0.0"), _expect(413, "ImageTooLarge")),
    ("lengths that disagree", lambda lv: _raw(
        lv, "PUT", _upload_path(lv, "liar"), b"0123456789", token=None,
        Content_Range="bytes 0-9/50", Upload_Length="100"), _expect(400, "BadRequest")),
    ("malformed Content-Range", lambda lv: _raw(
        lv, "PUT", _upload_path(lv, "garbled"), b"x", token=None,
        Content_Range="bytes=0-"), _expect(400, "BadRequest")),
    ("tus PATCH of the wrong type", lambda lv: _raw(
        lv, "PATCH", _upload_path(lv, "typed"), b"x", token=None, Upload_Offset="0",
        Content_Type="text/plain"), _expect(415, "UnsupportedMediaType")),
]  # fmt: skip


def _upload_path(live: Live, name: str) -> str:
    """The upload URL path of a new image waiting for its upload."""
    live.server.create(manifest(name))
    return "/upload/" + live.server.upload_url(name).rsplit("/", 1)[1]


@pytest.mark.parametrize(("name", "send", "check"), CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_request(live: Live, name: str, send: Send, check: Callable) -> None:
    check(send(live))
    assert curl("-o", "/dev/null", live.server.url + "/healthz")[0] == 200


def test_an_empty_upload_is_not_an_image(live: Live) -> None:
    path = _upload_path(live, "empty")
    code, status = _raw(live, "POST", path, b"", token=None, Upload_Length="67108864")
    assert code == 201, status  # tus creation: the length, and no image yet
    assert live.server.get("empty")["status"]["phase"] != "Ready"
    path = _upload_path(live, "zero")
    code, status = _raw(live, "PUT", path, b"", token=None)
    assert (code, status["reason"]) == (422, "InvalidImage")
    assert live.server.get("zero")["status"]["phase"] == "Failed"


def test_a_failed_image_says_why_at_its_upload_url(live: Live) -> None:
    live.server.create(manifest("bad-sum", checksum={"sha256": "0" * 64}))
    path = "/upload/" + live.server.upload_url("bad-sum").rsplit("/", 1)[1]
    code, status = _raw(live, "PUT", path, os.urandom(1 << 20), token=None)
    assert (code, status["reason"]) == (422, "BadImageChecksum")
    code, status = _raw(live, "PUT", path, b"again", token=None)
    assert (code, status["reason"]) == (410, "BadImageChecksum")
    assert "sha256" in status["message"]


def test_zstd_frames_by_the_thousand_are_refused(live: Live) -> None:
    import zstandard

    frame = zstandard.ZstdCompressor().compress(b"\0" * 16)
    body = frame * ((2 << 20) // len(frame))
    path = _upload_path(live, "frames")
    started = time.process_time()
    code, status = _raw(live, "PUT", path, body, token=None)
    assert (code, status["reason"]) == (422, "InvalidImage"), status
    assert time.process_time() - started < 5


def test_link_local_and_credentials_in_urls(live: Live) -> None:
    live.server.create(_vi("metadata", dataSource=_http("http://169.254.169.254/latest/")))
    obj = live.server.wait_phase("metadata", ("Failed",), timeout=60)
    ready = obj["status"]["conditions"][0]
    assert ready["reason"] == "SourceUnreachable"
    assert "169.254.169.254" in ready["message"]
    live.server.create(_vi("secret-url", dataSource=_http("http://alice:hunter2@127.0.0.1:9/x")))
    obj = live.server.wait_phase("secret-url", ("Failed",), timeout=60)
    assert "hunter2" not in json.dumps(obj["status"])  # the spec is what its author wrote


def test_slow_heads_are_cut(live: Live) -> None:
    conns = [socket.create_connection(("127.0.0.1", live.server.port)) for _ in range(50)]
    for conn in conns:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        conn.settimeout(15)
    for conn in conns:
        with conn:
            assert conn.recv(1) == b""


def test_smuggling_and_oversized_heads(live: Live) -> None:
    for request in (
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 10_000 + b"\r\n",
        b"GET /\x00\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", live.server.port), timeout=15) as conn:
            conn.sendall(request)
            answer = conn.recv(4096)
            assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:100]


def test_the_upload_ran_through_it_all(live: Live) -> None:
    """Last: the upload that ran meanwhile is complete and right, and nothing broke."""
    live.upload.wait(timeout=600)
    answer = json.loads((live.work / "answer.json").read_text())
    assert answer["phase"] == "Ready", answer
    assert answer["checksum"]["sha256"] == live.upload_sha256
    assert live.healthz_worst[0] < 2.0, live.healthz_worst
    log = live.server.log_path.read_text()
    assert "Traceback" not in log
    assert "hunter2" not in log
    # The server kept taking the upload at the pace its sender set, all along.
    assert float(live.upload_speed.read_text()) > 0.7 * UPLOAD_RATE, live.upload_speed
