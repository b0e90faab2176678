"""Access to the API (README: "Access, and what the server refuses"), through the real
server and real curl."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from serverproc import API, Server, curl, free_port, manifest
from waiting import wait_until

VIEWER = "viewer-token-0123456789"
EDITOR = "editor-token-0123456789"
ADMIN = "admin-token-0123456789ab"
HASHED = "hashed-token-0123456789"
NARROW_ADMIN = "narrow-admin-0123456789"


def _tokens_file(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"tokens": entries}))
    return path


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Server]:
    """A server on loopback with a token file: access control is on."""
    tokens = _tokens_file(
        tmp_path / "tokens.yaml",
        [
            {"user": "vera", "token": VIEWER, "role": "view", "namespaces": ["team-a"]},
            {"user": "ed", "token": EDITOR, "role": "edit", "namespaces": ["team-a"]},
            {"user": "ada", "token": ADMIN, "role": "admin", "namespaces": "*"},
            {
                "user": "hash",
                "tokenSha256": hashlib.sha256(HASHED.encode()).hexdigest(),
                "role": "edit",
                "namespaces": "*",
            },
            {"user": "nat", "token": NARROW_ADMIN, "role": "admin", "namespaces": ["team-a"]},
        ],
    )
    with Server(tmp_path / "data", "--api-token-file", str(tokens)).start() as srv:
        yield srv


def _as(server: Server, token: str | None, method: str, path: str, body: Any = None):
    server.token = token
    try:
        return server.call(method, path, body)
    finally:
        server.token = None


def _cvi(cvi_name: str, source: dict[str, str] | None = None) -> dict[str, Any]:
    data_source = {"type": "ObjectRef", "objectRef": source} if source else {"type": "Upload"}
    return {
        "apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": "ClusterVirtualImage",
        "metadata": {"name": cvi_name},
        "spec": {"dataSource": data_source},
    }


def test_loopback_server_without_token_file_is_open(server: Server) -> None:
    code, body = server.call("GET", server.images_path())
    assert code == 200, body
    assert not (server.data_dir / "admin.token").exists()


def test_no_token_is_401_with_bearer_challenge(guarded: Server) -> None:
    head = subprocess.run(
        ["curl", "-sS", "-D", "-", "-o", "/dev/null", guarded.url + guarded.images_path()],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    assert head.startswith("http/1.1 401")
    assert "www-authenticate: bearer" in head
    code, status = curl(guarded.url + guarded.images_path())
    assert (code, status["reason"], status["code"]) == (401, "Unauthorized", 401)
    code, status = curl("-H", "Authorization: Bearer wrong", guarded.url + guarded.images_path())
    assert (code, status["reason"]) == (401, "Unauthorized")
    code, status = curl("-H", f"Authorization: Basic {ADMIN}", guarded.url + "/metrics")
    assert (code, status["reason"]) == (401, "Unauthorized")


def test_roles_and_namespaces(guarded: Server) -> None:
    team_a, team_b = guarded.images_path("team-a"), guarded.images_path("team-b")
    assert _as(guarded, VIEWER, "GET", team_a)[0] == 200
    code, status = _as(guarded, VIEWER, "POST", team_a, manifest("v1"))
    assert (code, status["reason"]) == (403, "Forbidden")
    assert "vera" in status["message"]
    assert _as(guarded, VIEWER, "GET", team_b)[0] == 403

    assert _as(guarded, EDITOR, "POST", team_a, manifest("e1"))[0] == 201
    assert _as(guarded, EDITOR, "POST", team_b, manifest("e1"))[0] == 403
    assert _as(guarded, EDITOR, "DELETE", guarded.images_path("team-a", "e1"))[0] == 200
    assert _as(guarded, VIEWER, "DELETE", guarded.images_path("team-a", "e1"))[0] == 403

    cvis = f"{API}/clustervirtualimages"
    assert _as(guarded, EDITOR, "POST", cvis, _cvi("c1"))[0] == 403
    assert _as(guarded, HASHED, "POST", cvis, _cvi("c1"))[0] == 403  # edit, every namespace
    assert _as(guarded, ADMIN, "POST", cvis, _cvi("c1"))[0] == 201
    assert _as(guarded, VIEWER, "GET", cvis + "/c1")[0] == 200  # cluster images are shared
    assert _as(guarded, HASHED, "POST", team_b, manifest("h1"))[0] == 201


def test_metrics_need_a_token_for_every_namespace(guarded: Server) -> None:
    assert _as(guarded, EDITOR, "GET", "/metrics")[0] == 403
    code, _ = curl(
        "-o", "/dev/null", "-H", f"Authorization: Bearer {ADMIN}", guarded.url + "/metrics"
    )
    assert code == 200


def test_upload_urls_need_only_their_own_token(guarded: Server, tmp_path: Path) -> None:
    assert _as(guarded, EDITOR, "POST", guarded.images_path("team-a"), manifest("up"))[0] == 201
    guarded.token = EDITOR
    url = guarded.upload_url("up", namespace="team-a")
    guarded.token = None
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(1 << 20))
    code, answer = curl("-T", str(image), url)
    assert (code, answer["phase"]) == (200, "Ready")


def test_a_cluster_image_from_a_namespace_needs_read_access_there(guarded: Server) -> None:
    cvis = f"{API}/clustervirtualimages"
    source = {"kind": "VirtualImage", "name": "x", "namespace": "team-b"}
    code, status = _as(guarded, NARROW_ADMIN, "POST", cvis, _cvi("copy", source))
    assert (code, status["reason"]) == (403, "Forbidden")
    assert "team-b" in status["message"]
    code, _ = _as(guarded, ADMIN, "POST", cvis, _cvi("copy", source))
    assert code == 201


def test_sighup_reads_the_token_file_again(guarded: Server, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    new = "fresh-token-0123456789"
    _tokens_file(tokens, [{"user": "new", "token": new, "role": "view", "namespaces": "*"}])
    os.kill(guarded.pid, signal.SIGHUP)
    wait_until(
        lambda: _as(guarded, new, "GET", guarded.images_path())[0] == 200,
        what="the new token to work",
    )
    assert _as(guarded, ADMIN, "GET", guarded.images_path())[0] == 401

    tokens.write_text("tokens: [oops")  # a broken file keeps what worked
    os.kill(guarded.pid, signal.SIGHUP)
    wait_until(
        lambda: "kept the previous tokens" in guarded.log_path.read_text(),
        what="the server to say it kept the previous tokens",
    )
    assert _as(guarded, new, "GET", guarded.images_path())[0] == 200


def test_beyond_loopback_the_server_writes_an_admin_token_once(tmp_path: Path) -> None:
    with Server(tmp_path / "data", host="0.0.0.0").start() as srv:
        path = srv.data_dir / "admin.token"
        token = path.read_text().strip()
        assert len(token) >= 40
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert srv.call("GET", srv.images_path())[0] == 401
        srv.token = token
        assert srv.call("GET", srv.images_path())[0] == 200
        srv.restart()
        assert path.read_text().strip() == token
        assert srv.call("GET", srv.images_path())[0] == 200
        log = srv.log_path.read_text()
        assert str(path.resolve()) in log
        assert token not in log


def test_api_listen_puts_the_api_on_its_own_listener(tmp_path: Path) -> None:
    api_port = free_port()
    srv = Server(tmp_path / "data", "--api-listen", f"127.0.0.1:{api_port}").start()
    api = f"http://127.0.0.1:{api_port}"
    try:
        code, status = curl(srv.url + srv.images_path())
        assert (code, status["reason"]) == (404, "NotFound")
        assert curl("-o", "/dev/null", srv.url + "/metrics")[0] == 404
        assert curl("-o", "/dev/null", api + "/metrics")[0] == 200
        code, obj = curl(
            "-X", "POST", "-H", "Content-Type: application/json",
            "--data-binary", json.dumps(manifest("split")), api + srv.images_path(),
        )  # fmt: skip
        assert code == 201, obj
        srv.url, main_url = api, srv.url
        url = srv.upload_url("split")
        assert url.startswith(main_url + "/upload/")
        image = tmp_path / "disk.raw"
        image.write_bytes(os.urandom(1 << 20))
        code, answer = curl("-T", str(image), url)
        assert (code, answer["phase"]) == (200, "Ready")
        assert curl("-o", "/dev/null", main_url + "/healthz")[0] == 200
    finally:
        srv.stop()


def test_a_token_file_that_cannot_be_used_stops_the_start(tmp_path: Path) -> None:
    tokens = _tokens_file(tmp_path / "t.yaml", [{"user": "x", "token": "short", "role": "view"}])
    srv = Server(tmp_path / "data", "--api-token-file", str(tokens))
    with pytest.raises(RuntimeError) as failed:
        srv.start()
    assert "16 characters" in str(failed.value)
    assert "Traceback" not in srv.log_path.read_text()
