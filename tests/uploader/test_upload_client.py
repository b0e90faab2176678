"""`dvcr-uploader upload FILE URL` end to end: the command as a subprocess, a real server,
and a deliberately faulty proxy that drops connections in the middle of a request body."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

import pytest
from diskimages import MiB, sha256_file, write_disk_image
from flakyhttp import RequestCuttingProxy, closed_port
from multidict import CIMultiDict
from serverproc import Server, manifest

from uploader.upload_client import UploadFailed, _answer_failure, _Retry, _size

ROOT = Path(__file__).resolve().parents[2]


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
    status = server.get("cut")["status"]
    assert status["phase"] == "Ready"
    assert status["checksum"]["sha256"] == sha256
    if storage == "PersistentVolumeClaim":
        assert sha256_file(server.claim_dir("cut") / "disk.img") == sha256


async def test_server_down_exits_3_after_the_retries(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * MiB)
    url = f"http://127.0.0.1:{closed_port()}/upload/some-token"

    code, _, err, seconds = await upload(
        "-q", "--retries", "2", "--retry-wait", "0.1", str(image), url
    )

    assert code == 3, err
    assert "(try 1 of 2)" in err and "(try 2 of 2)" in err
    assert "(try 3 of 2)" not in err
    assert "after 2 retries" in err
    assert "run the same command again" in err
    assert f"curl -C N -T {image} {url}" in err
    assert seconds < 20


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
        (503, {}, "", True),
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
