"""tus 1.0 `creation`, `creation-defer-length` and `creation-with-upload` on the upload
URLs, with curl and tuspy against a real server: a POST with `Upload-Length` (or
`Upload-Defer-Length: 1`) declares the upload's length and answers 201 with the URL itself
as `Location`, taking its body, if any, as the first bytes; the PATCHes that follow need not
repeat the length; `HEAD` says the length, or that it is deferred."""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from diskimages import MiB, qemu_convert, sha256_file, write_disk_image
from serverproc import Server, manifest
from tusclient import client as tus

PVC = "PersistentVolumeClaim"
DVCR = "ContainerRegistry"
TUS = ["-H", "Tus-Resumable: 1.0.0"]
PATCH = [*TUS, "-X", "PATCH", "-H", "Content-Type: application/offset+octet-stream"]


@dataclass
class Answer:
    code: int
    headers: dict[str, str]  # names in lower case
    body: str


def curl(*args: str, stdin: bytes | None = None) -> Answer:
    out = subprocess.run(
        ["curl", "-sS", "-D", "/dev/stderr", "-o", "/dev/stdout", "-w", "\n%{http_code}", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=True,
    )
    body, _, code = out.stdout.decode().rpartition("\n")
    blocks = [b for b in out.stderr.decode("latin-1").split("\r\n\r\n") if b.startswith("HTTP/")]
    headers: dict[str, str] = {}
    for line in blocks[-1].split("\r\n")[1:] if blocks else []:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(code), headers, body)


def create(url: str, *headers: str) -> Answer:
    """A tus creation request: POST, no body."""
    args = [*TUS, "-X", "POST"]
    for header in headers:
        args += ["-H", header]
    return curl(*args, url)


def patch(url: str, offset: int, data: bytes, *headers: str) -> Answer:
    args = [*PATCH, "-H", f"Upload-Offset: {offset}"]
    for header in headers:
        args += ["-H", header]
    return curl(*args, "--data-binary", "@-", url, stdin=data)


def head(url: str) -> dict[str, str]:
    answer = curl("-I", *TUS, url)
    assert answer.code == 200, answer
    return answer.headers


def phase(server: Server, name: str) -> Any:
    return server.get(name)["status"]["phase"]


def test_creation_declares_the_length_and_the_patches_follow(server: Server) -> None:
    data = os.urandom(3 * MiB)
    server.create(manifest("created"))
    url = server.upload_url("created")
    fresh = head(url)
    assert fresh["upload-defer-length"] == "1" and "upload-length" not in fresh

    answer = create(url, f"Upload-Length: {len(data)}")
    assert answer.code == 201, answer
    assert answer.headers["location"] == url
    assert answer.headers["tus-resumable"] == "1.0.0"
    assert answer.headers["upload-offset"] == "0"
    assert phase(server, "created") == "WaitForUserUpload"  # nothing received
    after = head(url)
    assert after["upload-length"] == str(len(data))
    assert after["upload-offset"] == "0"
    assert after["cache-control"] == "no-store"
    assert after["tus-resumable"] == "1.0.0"
    assert "upload-defer-length" not in after

    # The PATCHes carry no Upload-Length: the creation gave it.
    assert patch(url, 0, data[: 2 * MiB]).code == 204
    assert head(url)["upload-offset"] == str(2 * MiB)
    last = patch(url, 2 * MiB, data[2 * MiB :])
    assert last.code == 200, last
    status = server.get("created")["status"]
    assert status["phase"] == "Ready"
    assert status["checksum"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert sha256_file(server.claim_dir("created") / "disk.img") == hashlib.sha256(data).hexdigest()


def test_a_deferred_length_comes_with_the_last_patch(server: Server) -> None:
    data = os.urandom(3 * MiB)
    server.create(manifest("deferred"))
    url = server.upload_url("deferred")
    answer = create(url, "Upload-Defer-Length: 1")
    assert (answer.code, answer.headers["location"]) == (201, url), answer
    assert head(url)["upload-defer-length"] == "1"

    assert patch(url, 0, data[:MiB]).code == 204
    assert patch(url, MiB, data[MiB : 2 * MiB]).code == 204
    between = head(url)
    assert (between["upload-offset"], between["upload-defer-length"]) == (str(2 * MiB), "1")
    assert "upload-length" not in between
    assert phase(server, "deferred") != "Ready"

    last = patch(url, 2 * MiB, data[2 * MiB :], f"Upload-Length: {len(data)}")
    assert last.code == 200, last
    status = server.get("deferred")["status"]
    assert status["phase"] == "Ready"
    assert status["checksum"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_creation_after_bytes_keeps_the_offset(server: Server) -> None:
    data = os.urandom(2 * MiB)
    server.create(manifest("again"))
    url = server.upload_url("again")
    assert create(url, f"Upload-Length: {len(data)}").code == 201
    assert patch(url, 0, data[:MiB]).code == 204

    again = create(url, f"Upload-Length: {len(data)}")
    assert again.code == 201, again
    assert (again.headers["location"], again.headers["upload-offset"]) == (url, str(MiB))
    other = create(url, f"Upload-Length: {3 * MiB}")
    assert other.code == 400, other
    assert str(len(data)) in other.body and other.headers["upload-offset"] == str(MiB)
    deferred = create(url, "Upload-Defer-Length: 1")  # the length stays what it was
    assert deferred.code == 201, deferred
    assert head(url)["upload-length"] == str(len(data))
    assert head(url)["upload-offset"] == str(MiB)

    assert patch(url, MiB, data[MiB:]).code == 200
    assert phase(server, "again") == "Ready"
    ready = create(url, f"Upload-Length: {len(data)}")
    assert ready.code == 409 and "already Ready" in ready.body


def test_a_chunked_patch_past_the_created_length_is_refused(server: Server) -> None:
    server.create(manifest("chunked"))
    url = server.upload_url("chunked")
    assert create(url, f"Upload-Length: {2 * MiB}").code == 201
    answer = patch(url, 0, os.urandom(3 * MiB), "Transfer-Encoding: chunked")
    assert answer.code == 413, answer
    assert f"more than the {2 * MiB} bytes" in answer.body
    assert phase(server, "chunked") != "Ready"


def test_a_whole_upload_after_a_creation_brings_its_own_length(
    server: Server, tmp_path: Path
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(3 * MiB))
    server.create(manifest("whole"))
    url = server.upload_url("whole")
    assert create(url, f"Upload-Length: {5 * MiB}").code == 201
    answer = curl("-T", str(image), url)
    assert answer.code == 200, answer
    assert server.get("whole")["status"]["checksum"]["sha256"] == sha256_file(image)


@pytest.mark.parametrize(
    ("headers", "code", "words"),
    [
        (["Upload-Defer-Length: 2"], 400, "Upload-Defer-Length"),
        (["Upload-Length: 10", "Upload-Defer-Length: 1"], 400, "not both"),
        (["Upload-Length: ten"], 400, "not a number"),
        (["Upload-Length: 0"], 400, "at least one byte"),
        (["Upload-Length: 10", "Tus-Resumable: 0.2.2"], 412, "1.0.0"),
    ],
    ids=["defer-not-1", "both", "not-a-number", "zero", "tus-version"],
)
def test_bad_creation_requests_are_refused_and_change_nothing(
    server: Server, headers: list[str], code: int, words: str
) -> None:
    server.create(manifest("bad"))
    url = server.upload_url("bad")
    args = ["-X", "POST"]
    for header in headers:
        args += ["-H", header]
    answer = curl(*args, url)
    assert answer.code == code, answer
    assert words in answer.body
    if code == 412:
        assert answer.headers["tus-version"] == "1.0.0"
    assert phase(server, "bad") == "WaitForUserUpload"
    assert head(url)["upload-defer-length"] == "1"


def create_with(url: str, data: bytes, *headers: str) -> Answer:
    """A tus creation request with the upload's first bytes (creation-with-upload)."""
    args = [*TUS, "-X", "POST", "-H", "Content-Type: application/offset+octet-stream"]
    for header in headers:
        args += ["-H", header]
    return curl(*args, "--data-binary", "@-", url, stdin=data)


@pytest.mark.parametrize("storage", [PVC, DVCR])
def test_creation_with_upload_takes_the_first_bytes(server: Server, storage: str) -> None:
    data = os.urandom(3 * MiB)
    server.create(manifest("with-upload", storage=storage))
    url = server.upload_url("with-upload")
    first = create_with(url, data[:MiB], f"Upload-Length: {len(data)}")
    assert (first.code, first.headers["location"]) == (201, url), first
    assert first.headers["upload-offset"] == str(MiB)
    assert head(url)["upload-length"] == str(len(data))
    assert patch(url, MiB, data[MiB:]).code == 200
    status = server.get("with-upload")["status"]
    assert status["phase"] == "Ready"
    assert status["checksum"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_creation_with_the_whole_upload_makes_the_image_ready(server: Server) -> None:
    data = os.urandom(2 * MiB)
    server.create(manifest("all-at-once"))
    url = server.upload_url("all-at-once")
    answer = create_with(url, data, f"Upload-Length: {len(data)}")
    assert (answer.code, answer.headers["upload-offset"]) == (201, str(len(data))), answer
    status = server.get("all-at-once")["status"]
    assert status["phase"] == "Ready"
    assert status["checksum"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_creation_with_upload_and_a_deferred_length(server: Server) -> None:
    data = os.urandom(3 * MiB)
    server.create(manifest("later"))
    url = server.upload_url("later")
    answer = create_with(url, data[: 2 * MiB], "Upload-Defer-Length: 1")
    assert (answer.code, answer.headers["upload-offset"]) == (201, str(2 * MiB)), answer
    assert head(url)["upload-defer-length"] == "1"
    last = patch(url, 2 * MiB, data[2 * MiB :], f"Upload-Length: {len(data)}")
    assert last.code == 200, last
    assert server.get("later")["status"]["checksum"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_creation_with_upload_after_bytes_keeps_them_and_says_where_to_go_on(
    server: Server,
) -> None:
    data = os.urandom(3 * MiB)
    server.create(manifest("again"))
    url = server.upload_url("again")
    assert create(url, f"Upload-Length: {len(data)}").code == 201
    assert patch(url, 0, data[:MiB]).code == 204
    # A client that lost its state creates again, with the first bytes again: they are
    # not taken a second time, and the answer says where the upload stands.
    answer = create_with(url, data[:MiB], f"Upload-Length: {len(data)}")
    assert (answer.code, answer.headers["upload-offset"]) == (201, str(MiB)), answer
    assert head(url)["upload-offset"] == str(MiB)
    assert patch(url, MiB, data[MiB:]).code == 200
    assert server.get("again")["status"]["checksum"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_creation_with_upload_refuses_more_than_its_length(server: Server) -> None:
    server.create(manifest("too-much"))
    url = server.upload_url("too-much")
    answer = create_with(url, os.urandom(2 * MiB), f"Upload-Length: {MiB}")
    assert answer.code == 400, answer
    assert "goes past the end of the image" in answer.body
    assert phase(server, "too-much") == "WaitForUserUpload"


def test_registry_storage_needs_the_length_at_creation(server: Server) -> None:
    server.create(manifest("oci", storage=DVCR))
    url = server.upload_url("oci")
    answer = create(url, "Upload-Defer-Length: 1")
    assert answer.code == 411, answer
    assert "ContainerRegistry" in answer.body and "Upload-Length" in answer.body
    assert create(url, f"Upload-Length: {MiB}").code == 201
    assert patch(url, 0, os.urandom(MiB)).code == 200
    assert phase(server, "oci") == "Ready"


def test_an_unknown_token_is_404(server: Server) -> None:
    answer = create(server.url + "/upload/nope", "Upload-Length: 10")
    assert answer.code == 404, answer


def test_location_names_the_url_the_request_came_to(server: Server) -> None:
    """Through another host name than the status gives, Location is the request's URL."""
    server.create(manifest("host"))
    url = server.upload_url("host")
    path = urlsplit(url).path
    other = f"http://localhost:{server.port}{path}"
    answer = create(other, "Upload-Length: 10")
    assert (answer.code, answer.headers["location"]) == (201, other), answer


def test_options_advertise_creation(server: Server) -> None:
    server.create(manifest("opts"))
    answer = curl("-X", "OPTIONS", server.upload_url("opts"))
    assert answer.code == 204
    extensions = answer.headers["tus-extension"].split(",")
    assert {"creation", "creation-defer-length", "creation-with-upload"} <= set(extensions)
    assert answer.headers["tus-version"] == "1.0.0"


@pytest.mark.parametrize("storage", [PVC, DVCR])
def test_tuspy_creates_at_the_upload_url_and_uploads(
    server: Server, tmp_path: Path, storage: str
) -> None:
    raw = tmp_path / "disk.raw"
    raw_sha256, _ = write_disk_image(raw, 16 * MiB, seed=3)
    image = qemu_convert(raw, "qcow2", tmp_path / "disk.qcow2")
    server.create(manifest("tuspy", storage=storage))
    url = server.upload_url("tuspy")

    # No headers: the length goes with tuspy's creation POST, not with its PATCHes.
    uploader = tus.TusClient(url).uploader(file_path=str(image), chunk_size=2 * MiB)
    uploader.upload()
    assert uploader.url == url
    assert uploader.offset == image.stat().st_size
    status = server.get("tuspy")["status"]
    assert status["phase"] == "Ready", status
    assert status["checksum"]["sha256"] == sha256_file(image)
    assert status["format"] == "qcow2"
    if storage == PVC:
        assert sha256_file(server.claim_dir("tuspy") / "disk.img") == raw_sha256
