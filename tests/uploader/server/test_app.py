"""The server's own answers: aiohttp's errors as Status objects, a deadline for request
heads, a log that cannot be forged, quotas, and a start that survives a broken image."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest
from serverproc import API, Server, curl, manifest
from waiting import wait_until

from uploader.server.app import bind, escape_for_log
from uploader.server.image_db import Store


@pytest.mark.parametrize(
    ("args", "code", "reason"),
    [
        (["/nope"], 404, "NotFound"),
        ([f"{API}/namespaces/default/nothings"], 404, "NotFound"),
        (["-X", "DELETE", "/healthz"], 405, "MethodNotAllowed"),
        (["-X", "PATCH", f"{API}/namespaces/default/virtualimages"], 405, "MethodNotAllowed"),
        (["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", "@BIG",
          f"{API}/namespaces/default/virtualimages"], 413, "RequestEntityTooLarge"),
        (["-X", "POST", "--data-binary", "{}", f"{API}/namespaces/default/virtualimages"],
         422, "Invalid"),
        (["-X", "POST", "--data-binary", '{"apiVersion": "virtualization.deckhouse.io/v1alpha2",'
          ' "kind": "VirtualImage", "metadata": {}, "spec": {}}',
          f"{API}/namespaces/default/virtualimages"], 422, "Invalid"),
        ([f"{API}/namespaces/Not_A_Namespace/virtualimages"], 422, "Invalid"),
        ([f"{API}/namespaces/default/virtualimages/..%2F..%2Fetc"], 404, "NotFound"),
    ],
)  # fmt: skip
def test_aiohttp_errors_are_status_objects(
    server: Server, tmp_path: Path, args: list[str], code: int, reason: str
) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (2 << 20))
    args = [a.replace("@BIG", f"@{big}") for a in args]
    args[-1] = server.url + args[-1]
    got, status = curl(*args)
    assert (got, status["kind"], status["reason"], status["code"]) == (code, "Status", reason, code)
    assert status["message"]
    assert "Traceback" not in server.log_path.read_text()


def test_the_access_log_escapes_control_characters(server: Server) -> None:
    curl("-o", "/dev/null", server.url + "/x%0a127.0.0.1%20%22GET%20/forged%22%20200")
    wait_until(
        lambda: "/x\\x0a127.0.0.1" in server.log_path.read_text(),
        what="the request in the access log",
    )
    lines = server.log_path.read_text().splitlines()
    assert not any(line.startswith('127.0.0.1 "GET /forged') for line in lines)
    assert any("/x\\x0a127.0.0.1" in line for line in lines)
    assert escape_for_log("a\rb\x1b[31m\u2028") == "a\\x0db\\x1b[31m\\x2028"


def test_a_connection_that_trickles_its_head_is_closed(tmp_path: Path) -> None:
    with Server(tmp_path / "data", "--header-timeout", "1").start() as srv:
        slow = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
        for conn in slow:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for conn in slow:
            conn.settimeout(10)
            while True:
                try:
                    conn.sendall(b"X-Slow: 1\r\n")
                    if conn.recv(1) == b"":
                        break
                except (ConnectionError, TimeoutError):
                    break
        assert time.monotonic() - started < 6
        # A prompt client on a kept-alive connection is served, twice.
        with socket.create_connection(("127.0.0.1", srv.port)) as conn:
            for _ in range(2):
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert conn.recv(4096).startswith(b"HTTP/1.1 200")
                time.sleep(0.3)  # idle between requests, as a kept-alive client is


def test_a_bound_socket_refuses_connections_until_the_server_listens() -> None:
    sock = bind("127.0.0.1:0")
    try:
        port = sock.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        sock.close()


def _stored_image(name: str, storage: str, phase: str, namespace: str = "default") -> dict:
    obj = manifest(name, storage=storage)
    obj["metadata"].update(
        namespace=namespace,
        uid=str(uuid.uuid4()),
        generation=1,
        creationTimestamp="2026-01-01T00:00:00Z",
    )
    token = "t" + uuid.uuid4().hex * 2
    obj["status"] = {
        "phase": phase,
        "imageUploadURLs": {"external": f"http://x/upload/{token}"},
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": phase,
                "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
    }
    return obj


def test_one_image_that_cannot_be_recovered_fails_alone(tmp_path: Path) -> None:
    """A storage error on one image (its namespace's claim directory is a file), and a
    state written by an older version (a name too long for a claim directory)."""
    data = tmp_path / "data"
    store = Store(data / "state.db")
    store.save(_stored_image("broken", "PersistentVolumeClaim", "Provisioning", "blocked"))
    store.save(_stored_image("n" * 253, "PersistentVolumeClaim", "WaitForUserUpload"))
    store.save(_stored_image("gone-" + "n" * 250, "PersistentVolumeClaim", "Terminating"))
    store.save(_stored_image("fine", "PersistentVolumeClaim", "WaitForUserUpload"))
    store.close()
    (data / "pvc").mkdir()
    (data / "pvc" / "blocked").write_text("not a directory")
    with Server(data).start() as srv:
        broken = srv.get("broken", namespace="blocked")
        ready = broken["status"]["conditions"][0]
        assert (broken["status"]["phase"], ready["reason"]) == ("Failed", "ProvisioningFailed")
        assert "restart" in ready["message"]
        assert srv.get("fine")["status"]["phase"] == "WaitForUserUpload"
        assert srv.call("GET", srv.images_path(name="gone-" + "n" * 250))[0] == 404
        assert srv.call("DELETE", srv.images_path(name="n" * 253))[0] == 200
        srv.wait_gone("n" * 253)
        assert srv.call("DELETE", srv.images_path("blocked", "broken"))[0] == 200
        srv.create(manifest("after"))


def test_quotas_per_namespace_and_in_total(tmp_path: Path) -> None:
    with Server(
        tmp_path / "data", "--max-images-per-namespace", "2", "--max-images", "3"
    ).start() as srv:
        srv.create(manifest("a1"), namespace="a")
        srv.create(manifest("a2"), namespace="a")
        code, status = srv.call("POST", srv.images_path("a"), manifest("a3"))
        assert (code, status["reason"]) == (403, "Forbidden")
        assert "--max-images-per-namespace" in status["message"]
        srv.create(manifest("b1"), namespace="b")
        code, status = srv.call("POST", srv.images_path("c"), manifest("c1"))
        assert (code, status["reason"]) == (403, "Forbidden")
        assert "--max-images" in status["message"]
        assert srv.call("DELETE", srv.images_path("a", "a1"))[0] == 200
        srv.wait_gone("a1", namespace="a")
        srv.create(manifest("a3"), namespace="a")
