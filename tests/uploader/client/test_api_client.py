"""The API client against a real server: answers as they come, errors as ClientError, a
watch that is open before the change it reports, and waiting for an image's phase."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from serverproc import Server, free_port, manifest

from uploader.client.api_client import ApiClient, ClientError, phase
from uploader.client.credentials import Credentials
from uploader.resources import VIRTUAL_IMAGE


def test_call_answers_with_the_status_and_the_body_error_or_not(server: Server) -> None:
    api = ApiClient(server.url)
    code, created = api.call("POST", api.path(VIRTUAL_IMAGE, "default"), manifest("one"))
    assert code == 201 and created["metadata"]["name"] == "one"
    code, missing = api.call("GET", api.path(VIRTUAL_IMAGE, "default", "nope"))
    assert (code, missing["kind"], missing["reason"]) == (404, "Status", "NotFound")


def test_the_resource_methods_raise_the_servers_status(server: Server) -> None:
    api = ApiClient(server.url)
    with pytest.raises(ClientError) as missing:
        api.get(VIRTUAL_IMAGE, "default", "nope")
    assert (missing.value.code, missing.value.reason) == (404, "NotFound")
    api.create(VIRTUAL_IMAGE, "default", manifest("twice"))
    with pytest.raises(ClientError) as twice:
        api.create(VIRTUAL_IMAGE, "default", manifest("twice"))
    assert twice.value.code == 409


def test_a_rejected_token_says_where_it_came_from(tmp_path: Path) -> None:
    # Beyond loopback the server asks for its admin token.
    with Server(tmp_path / "data", host="0.0.0.0").start() as srv:
        wrong = ApiClient(srv.url, Credentials("x" * 40, token_source="DVCR_TOKEN"))
        with pytest.raises(ClientError) as refused:
            wrong.list(VIRTUAL_IMAGE, "default")
        assert (refused.value.code, refused.value.reason) == (401, "Unauthorized")
        assert "does not accept the token from DVCR_TOKEN" in refused.value.message
        assert wrong.call("GET", wrong.path(VIRTUAL_IMAGE, "default"))[0] == 401
        token = (srv.data_dir / "admin.token").read_text().strip()
        right = ApiClient(srv.url, Credentials(token, token_source="DVCR_TOKEN"))
        assert right.list(VIRTUAL_IMAGE, "default")["items"] == []


def test_an_unreachable_server_is_a_client_error() -> None:
    api = ApiClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ClientError, match=r"cannot reach the server at .*: Connection refused"):
        api.list(VIRTUAL_IMAGE, "default")
    with pytest.raises(ClientError, match="Connection refused"):
        api.call("GET", "/healthz")


def test_waiting_for_a_phase_and_for_the_upload_url(server: Server) -> None:
    api = ApiClient(server.url)
    api.create(VIRTUAL_IMAGE, "default", manifest("up"))
    obj = api.wait_for_phase("up", ("WaitForUserUpload",), timeout=30)
    assert phase(obj) == "WaitForUserUpload"
    assert api.upload_url("up") == obj["status"]["imageUploadURLs"]["external"]
    with pytest.raises(ClientError, match=r"did not get to phase \('Ready',\) in 0.2s"):
        api.wait_for_phase("up", ("Ready",), timeout=0.2)


def test_waiting_until_an_image_is_gone(server: Server) -> None:
    api = ApiClient(server.url)
    api.create(VIRTUAL_IMAGE, "default", manifest("gone"))
    with pytest.raises(ClientError, match="is still there"):
        api.wait_gone("gone", timeout=0.2)
    api.delete(VIRTUAL_IMAGE, "default", "gone")
    api.wait_gone("gone", timeout=30)


def test_an_open_watch_sees_an_image_made_after_it_opened(server: Server) -> None:
    api = ApiClient(server.url)
    with api.open_watch(VIRTUAL_IMAGE, "default", "later", timeout=30) as events:
        # Made by another thread once the watch is open: no event can have been missed.
        maker = threading.Thread(
            target=api.create, args=(VIRTUAL_IMAGE, "default", manifest("later"))
        )
        maker.start()
        try:
            for event in events:
                if phase(event["object"]) == "WaitForUserUpload":
                    break
        finally:
            maker.join()
    assert event["object"]["metadata"]["name"] == "later"
