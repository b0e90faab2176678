"""`dvcr-uploader upload FILE URL|vi/NAME` end to end: the command as a subprocess, a real
server, a deliberately faulty proxy that drops connections in the middle of a request body,
another that answers error statuses in the server's place, and, where the real server
cannot be made to misbehave, a fake upload URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from diskimages import MiB, sha256_file, write_disk_image
from flakyhttp import RequestCuttingProxy, closed_port
from multidict import CIMultiDict
from serverproc import Server, manifest

from uploader.client.resumable_upload import UploadFailed, _answer_failure, _Retry, _size

ROOT = Path(__file__).resolve().parents[3]


async def upload(*args: str, stdin: bytes | None = None) -> tuple[int, str, str, float]:
    """Runs `dvcr-uploader upload ARGS`; returns exit code, stdout, stderr, seconds."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uploader.cli",
        "upload",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 300)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - started


def error_lines(stderr: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("error:")]


class StatusInjectingProxy:
    """A deliberately faulty proxy, for tests only: forwards connections to the server on
    `upstream_port`, except that the first `count` PUTs (every PUT when `count` is None) are
    answered by the proxy itself with `status` and a JSON Status, after their whole body
    was read, as a failing server or a proxy in front of it would."""

    def __init__(self, upstream_port: int, status: int, count: int | None) -> None:
        self.upstream_port = upstream_port
        self.status = status
        self.left = count
        self.injected = 0
        self.puts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    def url(self, upload_url: str) -> str:
        return f"http://127.0.0.1:{self.port}/{upload_url.split('/', 3)[3]}"

    async def __aenter__(self) -> StatusInjectingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        answers = asyncio.ensure_future(_copy(up_reader, writer))
        self._tasks.add(answers)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    headers = {
                        k.strip().lower(): v.strip()
                        for k, _, v in (line.partition(":") for line in lines[1:])
                    }
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                    if lines[0].startswith("PUT "):
                        self.puts += 1
                        if self.left is None or self.left > 0:
                            self.left = None if self.left is None else self.left - 1
                            self.injected += 1
                            await self._answer(writer)
                            return
                    up_writer.write(head + body)
                    await up_writer.drain()
        finally:
            answers.cancel()
            self._tasks.discard(answers)
            up_writer.transport.abort()
            writer.transport.abort()

    async def _answer(self, writer: asyncio.StreamWriter) -> None:
        body = json.dumps(
            {"kind": "Status", "reason": "Injected", "message": "by the test's proxy"}
        ).encode()
        writer.write(
            f"HTTP/1.1 {self.status} Injected\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()


@contextlib.asynccontextmanager
async def fake_upload_url(
    answer: dict[str, object], status: int = 200
) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """A fake upload URL, not the real server: it takes any PUT from byte 0 and answers it
    with `status` and `answer` (a GET and a HEAD of a `status` of 400 or more answer the
    same), so a test can have the server claim what the real one never would (a wrong
    checksum). Yields the URL and the requests it got."""
    seen: list[web.Request] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        if request.method == "PUT":
            await request.read()
        elif request.method == "HEAD" and status < 400:
            return web.Response(headers={"Upload-Offset": "0", "Tus-Resumable": "1.0.0"})
        if request.method == "HEAD":
            return web.Response(status=status)
        return web.json_response(answer, status=status)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/upload/{token}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/upload/fake-token", seen
    finally:
        await runner.cleanup()


def resume_lines(stderr: str) -> list[str]:
    # The bar redraws with carriage returns; tqdm.write puts each notice on a line of its own.
    return [line for line in re.split(r"[\r\n]", stderr) if "; resuming at " in line]


def content_range_start(content_range: str | None) -> int:
    if content_range is None:
        return 0
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range)
    assert match, content_range
    return int(match[1])


# -- end to end -------------------------------------------------------------------------


async def test_clean_upload(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 24 * MiB, seed=11)
    server.create(manifest("clean"))
    url = server.upload_url("clean")

    code, out, err, _ = await upload(str(image), url)

    assert code == 0, err
    answer = json.loads(out)
    assert answer["phase"] == "Ready"
    assert answer["checksum"]["sha256"] == sha256
    assert "100%" in err
    assert resume_lines(err) == []
    assert f"sha256 {sha256}: the image holds {image}" in err  # compared with the file's
    assert server.get("clean")["status"]["checksum"]["sha256"] == sha256


@pytest.mark.parametrize("storage", ["PersistentVolumeClaim", "ContainerRegistry"])
async def test_upload_cut_three_times_resumes_to_the_same_image(
    server: Server, tmp_path: Path, storage: str
) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 48 * MiB, seed=12)
    server.create(manifest("cut", storage=storage))
    url = server.upload_url("cut")
    cuts = [5 * MiB, 11 * MiB, 3 * MiB + 12345]

    async with RequestCuttingProxy(server.port, cuts, settle=True) as proxy:
        code, out, err, _ = await upload("--retry-wait", "0.2", str(image), proxy.url(url))

    assert code == 0, err
    assert proxy.cut == 3
    lines = resume_lines(err)
    assert len(lines) == 3, err
    for line in lines:
        assert line.startswith("connection lost at "), line
        assert "(try 1 of 10)" in line, line  # each cut came after progress: tries start over
    # Four PUTs: the first from byte 0, each later one where the server said it stood,
    # further along each time.
    puts = proxy.puts()
    assert len(puts) == 4, proxy.requests
    assert puts[0] is None
    starts = [content_range_start(r) for r in puts]
    assert 0 < starts[1] < starts[2] < starts[3] < 48 * MiB, puts
    assert starts[1] <= cuts[0]
    for content_range in puts[1:]:
        assert content_range is not None and content_range.endswith(f"-{48 * MiB - 1}/{48 * MiB}")
    answer = json.loads(out)
    assert answer["phase"] == "Ready"
    # The file's hash, made while the bytes went out in four pieces, is the image's.
    assert f"sha256 {sha256}: the image holds" in err
    status = server.get("cut")["status"]
    assert status["phase"] == "Ready"
    assert status["checksum"]["sha256"] == sha256
    if storage == "PersistentVolumeClaim":
        assert sha256_file(server.claim_dir("cut") / "disk.img") == sha256


async def test_a_server_that_is_not_there_fails_at_once(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * MiB)
    port = closed_port()
    url = f"http://127.0.0.1:{port}/upload/some-token"

    code, out, err, seconds = await upload(str(image), url)  # default retries and waits

    assert code == 3, err
    assert out == ""
    assert error_lines(err) == [
        f"error: cannot reach the server at http://127.0.0.1:{port}: Connection refused"
    ]
    assert "(try" not in err
    assert "some-token" not in err
    assert seconds < 5


async def test_give_up_then_the_same_command_continues(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 32 * MiB, seed=13)
    server.create(manifest("again"))
    url = server.upload_url("again")

    async with RequestCuttingProxy(server.port, [9 * MiB]) as proxy:
        code, _, err, _ = await upload("-q", "--retries", "0", str(image), proxy.url(url))
        assert code == 3, err
        match = re.search(r"the server had (\d+) bytes when last asked", err)
        assert match, err
        offset = int(match[1])
        assert 0 < offset <= 9 * MiB
        assert f"curl -C {offset} -T {image} {proxy.url(url)}" in err

        code, out, err, _ = await upload("-q", str(image), proxy.url(url))

    assert code == 0, err
    # It goes on where the server stands now: at least where it stood when last asked
    # (the server may still have been taking in the cut body's last bytes then).
    assert len(proxy.puts()) == 2
    start = content_range_start(proxy.puts()[-1])
    assert offset <= start <= 9 * MiB
    assert json.loads(out)["phase"] == "Ready"
    # This run sent only the rest, yet hashed the whole file: the first part from the file.
    assert f"sha256 {sha256}: the image holds" in err
    assert server.get("again")["status"]["checksum"]["sha256"] == sha256


async def test_wrong_token_exits_1_at_once(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_disk_image(image, 64 * MiB, seed=14)
    server.create(manifest("tok"))
    url = server.upload_url("tok")

    code, _, err, seconds = await upload("-q", str(image), url[:-4] + "AAAA")

    assert code == 1, err
    assert "404" in err
    assert "wrong or expired token" in err  # the server's own message
    assert resume_lines(err) == []
    assert seconds < 10
    assert server.get("tok")["status"]["phase"] == "WaitForUserUpload"


async def test_refused_image_exits_1(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_disk_image(image, 16 * MiB, seed=15)
    server.create(manifest("bad", checksum={"sha256": "0" * 64}))
    url = server.upload_url("bad")

    code, out, err, _ = await upload("-q", str(image), url)

    assert code == 1, err
    assert out == ""
    assert "422" in err and "BadImageChecksum" in err
    assert resume_lines(err) == []
    status = server.get("bad")["status"]
    assert status["phase"] == "Failed"
    assert status["conditions"][0]["reason"] == "BadImageChecksum"


async def test_stdin_is_sent_once(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 16 * MiB, seed=16)
    data = image.read_bytes()
    server.create(manifest("piped"))
    server.create(manifest("piped-cut"))
    url, cut_url = server.upload_url("piped"), server.upload_url("piped-cut")

    code, out, err, _ = await upload("-q", "-", url, stdin=data)
    assert code == 0, err
    assert json.loads(out)["checksum"]["sha256"] == sha256
    assert f"sha256 {sha256}: the image holds standard input" in err

    async with RequestCuttingProxy(server.port, [2 * MiB]) as proxy:
        code, _, err, _ = await upload("-q", "-", proxy.url(cut_url), stdin=data)
    assert code == 3, err
    assert "standard input can be read only once" in err
    assert len(proxy.puts()) == 1


# -- what is worth another try -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "message", "again"),
    [
        (500, {}, "boom", True),
        (502, {}, "", True),
        (503, {}, "", True),
        (504, {}, "", True),
        (501, {}, "", False),
        (507, {}, "no space", False),
        (408, {"Upload-Offset": "7"}, "nothing arrived", True),
        (409, {"Upload-Offset": "7"}, "another upload to this image is in progress", True),
        (409, {}, "another upload to this image is in progress", True),
        (409, {"Upload-Offset": "7"}, "a newer request continues this upload", True),
        (416, {"Upload-Offset": "7"}, "the upload continues at byte 7", True),
        (409, {}, "the image default/x is already Ready", False),
        (401, {}, "", False),
        (403, {}, "", False),
        (404, {}, "wrong or expired token", False),
        (411, {}, "", False),
        (413, {}, "too large", False),
        (422, {}, "bad checksum", False),
    ],
)
def test_which_answers_are_worth_another_try(
    status: int, headers: dict[str, str], message: str, again: bool
) -> None:
    body = json.dumps({"kind": "Status", "reason": "Because", "message": message, "code": status})
    failure = _answer_failure(status, "Reason", CIMultiDict(headers), body)  # type: ignore[arg-type]
    assert isinstance(failure, _Retry if again else UploadFailed)
    assert f"{status} Because" in str(failure)
    if not again:
        assert isinstance(failure, UploadFailed) and failure.exit_code == 1


def test_sizes_read_well() -> None:
    assert _size(0) == "0 B"
    assert _size(1023) == "1023 B"
    assert _size(5 * MiB) == "5 MiB"
    assert _size(int(1.19 * 1024 * MiB)) == "1.19 GiB"


def test_a_500_is_worth_two_more_tries_only() -> None:
    body = json.dumps({"reason": "InternalError", "message": "boom"})
    server_error = _answer_failure(500, "Internal", CIMultiDict(), body)  # type: ignore[arg-type]
    proxy_error = _answer_failure(503, "Unavailable", CIMultiDict(), "")  # type: ignore[arg-type]
    assert isinstance(server_error, _Retry) and server_error.limit == 2
    assert isinstance(proxy_error, _Retry) and proxy_error.limit is None


def test_a_gone_image_says_why_it_failed() -> None:
    body = json.dumps({"reason": "BadImageChecksum", "message": "sha256 is not 00"})
    failure = _answer_failure(410, "Gone", CIMultiDict(), body)  # type: ignore[arg-type]
    assert isinstance(failure, UploadFailed) and failure.exit_code == 1
    assert failure.message == "the image failed (BadImageChecksum): sha256 is not 00"


# -- errors answered in the server's place ---------------------------------------------------


async def test_a_500_is_tried_again(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 4 * MiB, seed=21)
    server.create(manifest("five-hundred"))
    url = server.upload_url("five-hundred")

    async with StatusInjectingProxy(server.port, 500, count=1) as proxy:
        code, out, err, _ = await upload("-q", "--retry-wait", "0.1", str(image), proxy.url(url))

    assert code == 0, err
    assert proxy.injected == 1 and proxy.puts == 2
    assert "the server answered 500 Injected: by the test's proxy" in err
    assert "(try 1 of 2)" in err  # a 500 is worth two tries, not --retries
    assert json.loads(out)["checksum"]["sha256"] == sha256


async def test_a_500_that_stays_gives_up_after_two_tries(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_disk_image(image, 2 * MiB, seed=22)
    server.create(manifest("always-500"))
    url = server.upload_url("always-500")

    async with StatusInjectingProxy(server.port, 500, count=None) as proxy:
        code, _, err, seconds = await upload(
            "-q", "--retry-wait", "0.1", str(image), proxy.url(url)
        )

    assert code == 3, err
    assert proxy.puts == 3
    assert "(try 2 of 2)" in err and "(try 3" not in err
    assert "after 2 retries" in err
    assert seconds < 10


async def test_a_proxys_503_is_tried_with_the_whole_budget(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 4 * MiB, seed=23)
    server.create(manifest("proxy-503"))
    url = server.upload_url("proxy-503")

    async with StatusInjectingProxy(server.port, 503, count=4) as proxy:
        code, out, err, _ = await upload("-q", "--retry-wait", "0.05", str(image), proxy.url(url))

    assert code == 0, err
    assert proxy.injected == 4 and proxy.puts == 5
    assert "(try 4 of 10)" in err
    assert json.loads(out)["checksum"]["sha256"] == sha256


async def test_a_wrong_checksum_from_the_server_exits_1(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 3 * MiB, seed=24)
    wrong = "0" * 64
    answer = {"phase": "Ready", "offset": 3 * MiB, "checksum": {"sha256": wrong}}

    async with fake_upload_url(answer) as (url, seen):
        code, out, err, _ = await upload("-q", "--token", "not-for-uploads", str(image), url)

    assert code == 1, err
    assert out == ""
    assert error_lines(err) == [
        f"error: checksum mismatch: the image has sha256 {wrong}, {image} has {sha256}; "
        "the bytes the server received are not those of the file"
    ]
    assert [r.method for r in seen] == ["HEAD", "PUT"]
    assert all("Authorization" not in r.headers for r in seen)  # the API's token stays home
    assert "not-for-uploads" not in err


async def test_the_upload_url_of_a_failed_image_says_why_at_once(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(MiB))
    answer = {
        "kind": "Status",
        "status": "Failure",
        "reason": "BadImageChecksum",
        "message": "the image's sha256 is 11..., not 00... as the spec says",
        "code": 410,
    }

    async with fake_upload_url(answer, status=410) as (url, seen):
        code, _, err, seconds = await upload("-q", str(image), url)

    assert code == 1, err
    assert error_lines(err) == [
        "error: the image failed (BadImageChecksum): the image's sha256 is 11..., not 00... "
        "as the spec says"
    ]
    assert "PUT" not in [r.method for r in seen]
    assert seconds < 5


# -- images that are already Ready or Failed ------------------------------------------------


async def test_ready_image_by_name_compares_the_file(server: Server, tmp_path: Path) -> None:
    image, other = tmp_path / "disk.raw", tmp_path / "other.raw"
    sha256, _ = write_disk_image(image, 8 * MiB, seed=25)
    other_sha256, _ = write_disk_image(other, 8 * MiB, seed=26)
    server.create(manifest("named"), namespace="team")
    server.upload_url("named", namespace="team")
    by_name = ("--server", server.url, "-n", "team")

    code, out, err, _ = await upload(*by_name, "-q", str(image), "vi/named")
    assert code == 0, err
    assert json.loads(out)["checksum"]["sha256"] == sha256

    code, out, err, _ = await upload(*by_name, str(image), "vi/named")
    assert code == 0, err
    assert f"already uploaded: vi/named is Ready and holds {image} (sha256 {sha256})" in err
    assert json.loads(out)["checksum"]["sha256"] == sha256

    code, out, err, _ = await upload(*by_name, "-", "virtualimage/named", stdin=image.read_bytes())
    assert code == 0, err
    assert "already uploaded: vi/named is Ready and holds standard input" in err

    code, out, err, _ = await upload(*by_name, str(other), "vi/named")
    assert code == 1, err
    assert out == ""
    assert error_lines(err) == [
        f"error: checksum mismatch: vi/named has sha256 {sha256}, {other} has {other_sha256}; "
        "it was Ready before this upload: to put this file in its place, delete the image and "
        "create it again"
    ]
    status = server.get("named", namespace="team")["status"]
    assert status["checksum"]["sha256"] == sha256  # untouched


async def test_ready_image_by_url_and_a_file_of_another_size(
    server: Server, tmp_path: Path
) -> None:
    image, longer = tmp_path / "disk.raw", tmp_path / "longer.raw"
    write_disk_image(image, 4 * MiB, seed=27)
    write_disk_image(longer, 5 * MiB, seed=28)
    server.create(manifest("sized"))
    url = server.upload_url("sized")
    assert (await upload("-q", str(image), url))[0] == 0

    code, out, err, seconds = await upload("-q", str(longer), url)

    assert code == 1, err
    assert out == ""
    assert error_lines(err) == [
        f"error: the image is already Ready and holds another file: {4 * MiB} bytes, "
        f"{longer} has {5 * MiB}"
    ]
    assert seconds < 10


async def test_ready_image_by_url_compares__needs_checksum_in_upload_url_get(
    server: Server, tmp_path: Path
) -> None:
    """Needs the server's upload URL GET to tell a Ready image's checksum (see the report);
    without it, the URL form cannot compare and exits 1."""
    image, same_size = tmp_path / "disk.raw", tmp_path / "same-size.raw"
    sha256, _ = write_disk_image(image, 4 * MiB, seed=29)
    write_disk_image(same_size, 4 * MiB, seed=30)
    server.create(manifest("by-url"))
    url = server.upload_url("by-url")
    assert (await upload("-q", str(image), url))[0] == 0

    code, _, err, _ = await upload("-q", str(image), url)
    assert code == 0, err
    assert f"already uploaded: the image is Ready and holds {image} (sha256 {sha256})" in err

    code, _, err, _ = await upload("-q", str(same_size), url)
    assert code == 1, err
    assert "checksum mismatch" in err

    # Standard input is refused (409) and read to its end, unsent, for its hash.
    code, _, err, _ = await upload("-q", "-", url, stdin=image.read_bytes())
    assert code == 0, err
    assert "already uploaded: the image is Ready and holds standard input" in err


async def test_failed_image_by_name_says_why(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_disk_image(image, 2 * MiB, seed=31)
    server.create(manifest("doomed", checksum={"sha256": "0" * 64}))
    url = server.upload_url("doomed")
    assert (await upload("-q", str(image), url))[0] == 1
    server.wait_phase("doomed", ("Failed",))

    code, _, err, seconds = await upload("--server", server.url, str(image), "vi/doomed")

    assert code == 1, err
    [line] = error_lines(err)
    assert line.startswith("error: vi/doomed failed (BadImageChecksum): ")
    assert seconds < 10


async def test_failed_image_by_url_says_why__needs_server_410(
    server: Server, tmp_path: Path
) -> None:
    """Needs the server to answer 410 with the failure's reason at a Failed image's upload
    URL (being added on the server side)."""
    image = tmp_path / "disk.raw"
    write_disk_image(image, 2 * MiB, seed=32)
    server.create(manifest("gone", checksum={"sha256": "0" * 64}))
    url = server.upload_url("gone")
    assert (await upload("-q", str(image), url))[0] == 1

    code, _, err, seconds = await upload("-q", str(image), url)

    assert code == 1, err
    [line] = error_lines(err)
    assert line.startswith("error: the image failed (BadImageChecksum): ")
    assert seconds < 10
