"""What an upload declares is held against what it sends: no image is Ready with fewer
bytes than declared or with none, declared lengths that disagree or exceed the limit are
refused before the body moves, and a failed image's upload URL says why it failed."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskimages import MiB
from serverproc import Server, curl, curl_sent, head_offset, manifest

STORAGES = ["PersistentVolumeClaim", "ContainerRegistry"]


def phase_of(server: Server, name: str) -> str:
    return server.get(name)["status"]["phase"]


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Server]:
    with Server(tmp_path / "data", "--max-image-size", "8Mi").start() as srv:
        yield srv


@pytest.mark.parametrize("storage", STORAGES)
def test_an_empty_body_fails_the_image(server: Server, storage: str) -> None:
    server.create(manifest("empty", storage))
    url = server.upload_url("empty")
    code, body = curl("-X", "PUT", "--data-binary", "", url)
    assert (code, body["reason"]) == (422, "InvalidImage")
    assert "empty" in body["message"]
    status = server.get("empty")["status"]
    assert status["phase"] == "Failed"
    assert status["conditions"][0]["reason"] == "InvalidImage"


def test_an_empty_chunked_body_fails_the_image(server: Server) -> None:
    server.create(manifest("empty-chunked"))
    url = server.upload_url("empty-chunked")
    code, body = curl("-T", "-", url, stdin=b"")
    assert (code, body["reason"]) == (422, "InvalidImage")
    assert phase_of(server, "empty-chunked") == "Failed"


def test_a_creation_request_neither_completes_nor_starts(server: Server) -> None:
    """tus's creation request (Upload-Length, no body) neither completes the image nor
    starts a transfer."""
    server.create(manifest("creation"))
    url = server.upload_url("creation")
    code, body = curl("-X", "POST", "-H", "Upload-Length: 67108864", "--data-binary", "", url)
    assert (code, body) == (201, {})
    assert phase_of(server, "creation") == "WaitForUserUpload"
    assert head_offset(url) == 0


def test_a_chunked_body_short_of_its_upload_length_stays_resumable(
    server: Server, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB)
    server.create(manifest("short"))
    url = server.upload_url("short")
    code, _ = curl("-T", "-", "-H", f"Upload-Length: {len(data)}", url, stdin=data[:MiB])
    assert code == 204
    assert phase_of(server, "short") != "Ready"
    assert head_offset(url) == MiB
    rest = tmp_path / "rest"
    rest.write_bytes(data[MiB:])
    code, body = curl(
        "-T", str(rest), "-H", f"Content-Range: bytes {MiB}-{len(data) - 1}/2097152", url
    )
    assert code == 200, body
    status = server.get("short")["status"]
    assert status["phase"] == "Ready"
    assert status["checksum"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert status["size"]["unpackedBytes"] == str(len(data))


@pytest.mark.parametrize(
    "headers",
    [
        ["-H", "Upload-Length: 100", "-H", "Content-Range: bytes 0-3145727/3145728"],
        ["-H", "Upload-Length: 5"],
        ["-H", "Content-Range: bytes 0-3145727/5"],
        ["-X", "PATCH", "-H", "Content-Type: application/offset+octet-stream",
         "-H", "Upload-Offset: 0", "-H", "Upload-Length: 5"],
        ["-X", "PATCH", "-H", "Content-Type: application/offset+octet-stream",
         "-H", "Upload-Offset: 10", "-H", "Upload-Length: 5"],
    ],
    ids=["upload-length-vs-range", "body-past-upload-length", "range-past-total",
         "tus-body-past-length", "tus-offset-past-length"],
)  # fmt: skip
def test_lengths_that_disagree_are_400_before_the_body(
    server: Server, tmp_path: Path, headers: list[str]
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(3 * MiB))
    server.create(manifest("liar"))
    url = server.upload_url("liar")
    code, body, sent = curl_sent("-T", str(image), *headers, url)
    assert (code, body["reason"]) == (400, "BadRequest"), body
    assert sent == 0  # answered from the Expect: 100-continue handler
    assert phase_of(server, "liar") == "WaitForUserUpload"


def test_an_upload_length_unlike_the_uploads_is_400(server: Server) -> None:
    data = os.urandom(2 * MiB)
    server.create(manifest("tus"))
    url = server.upload_url("tus")
    tus = ["-H", "Content-Type: application/offset+octet-stream", "-X", "PATCH"]
    code, _ = curl(*tus, "-H", "Upload-Offset: 0", "-H", f"Upload-Length: {len(data)}",
                   "--data-binary", "@-", url, stdin=data[:MiB])  # fmt: skip
    assert code == 204
    code, body = curl(*tus, "-H", f"Upload-Offset: {MiB}", "-H", f"Upload-Length: {3 * MiB}",
                      "--data-binary", "@-", url, stdin=data[MiB:])  # fmt: skip
    assert (code, body["reason"]) == (400, "BadRequest")
    assert str(len(data)) in body["message"]
    assert head_offset(url) == MiB
    code, body = curl(*tus, "-H", f"Upload-Offset: {MiB}", "--data-binary", "@-", url,
                      stdin=data[MiB:])  # fmt: skip
    assert code == 200, body
    assert server.get("tus")["status"]["checksum"]["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("storage", STORAGES)
def test_declared_sizes_over_the_limit_are_413_before_the_body(
    limited: Server, tmp_path: Path, storage: str
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(3 * MiB))
    limited.create(manifest("huge", storage))
    url = limited.upload_url("huge")
    last = 3 * MiB - 1
    tus = ["-X", "PATCH", "-H", "Content-Type: application/offset+octet-stream",
           "-H", "Upload-Offset: 0"]  # fmt: skip
    for headers in (
        ["-H", f"Content-Range: bytes 0-{last}/100000000000000000000000"],
        [*tus, "-H", "Upload-Length: 1000000000000000000"],
        [*tus, "-H", f"Upload-Length: {9 * MiB}"],
    ):
        code, body, sent = curl_sent("-T", str(image), *headers, url)
        assert (code, body["reason"]) == (413, "ImageTooLarge"), (headers, body)
        assert sent == 0
    # Numbers no byte count has, and digits that are not ASCII ones: 400, unread.
    for headers in (
        ["-H", f"Content-Range: bytes 0-{last}/{'9' * 5000}"],
        ["-H", "Upload-Length: ²"],
        ["-H", f"Content-Range: bytes 0-{last}/{3 * MiB}", "-H", "Upload-Length: -1"],
    ):
        code, body, sent = curl_sent("-T", str(image), *headers, url)
        assert (code, body["reason"]) == (400, "BadRequest"), (headers, body)
        assert sent == 0
    # None of it touched the image: it still takes its upload.
    assert phase_of(limited, "huge") == "WaitForUserUpload"
    code, body = curl("-T", str(image), url)
    assert code == 200, body


def test_a_failed_images_upload_url_says_why(tmp_path: Path) -> None:
    with Server(tmp_path / "data").start() as srv:
        image = tmp_path / "disk.raw"
        image.write_bytes(os.urandom(MiB))
        srv.create(manifest("bad", checksum={"sha256": "0" * 64}))
        url = srv.upload_url("bad")
        code, body = curl("-T", str(image), url)
        assert (code, body["reason"]) == (422, "BadImageChecksum")
        ready = srv.get("bad")["status"]["conditions"][0]
        tus = ["-X", "PATCH", "-H", "Content-Type: application/offset+octet-stream",
               "-H", "Upload-Offset: 0", "-H", "Upload-Length: 4"]  # fmt: skip
        for _ in range(2):  # and again after a restart
            for args in (["-T", str(image)], ["-X", "POST", "-d", "x"], [*tus, "-d", "abcd"], []):
                code, body = curl(*args, url)
                assert (code, body["reason"], body["message"]) == (
                    410,
                    "BadImageChecksum",
                    ready["message"],
                ), args
            head = subprocess.run(["curl", "-sSI", url], capture_output=True, text=True)
            assert head.stdout.startswith("HTTP/1.1 410")
            srv.restart()
        srv.call("DELETE", srv.images_path(name="bad"))
        srv.wait_gone("bad")
        code, body = curl("-T", str(image), url)
        assert (code, body["reason"]) == (404, "NotFound")
