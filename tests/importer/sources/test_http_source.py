"""HttpSource against real servers on loopback: nginx (directly, and behind a proxy that
cuts connections) and a deliberately faulty server of our own (flakyhttp.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import time
from pathlib import Path

import pytest
from flakyhttp import CuttingProxy, Faults, FlakyServer, closed_port
from nginxproc import Nginx
from testcerts import make_ca, make_server_cert

from importer.errors import SourceUnreachable, StartOver
from importer.sources.http import HttpSource, SourceChanged

MiB = 1 << 20
DATA = os.urandom(3 * MiB + 12345)
FAST = {"backoff": 0.01}  # retries in tests need not wait


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def download(url: str, received: list[bytes] | None = None, **kwargs: object) -> HttpSource:
    """Runs a download to its end; the bytes handed out are appended to `received`."""
    parts = received if received is not None else []
    buffer = memoryview(bytearray(300_000))  # not a divisor of any body's length
    async with HttpSource(url, **kwargs) as source:  # type: ignore[arg-type]
        while n := await source.readinto(buffer):
            parts.append(bytes(buffer[:n]))
    return source


async def fetch(url: str, **kwargs: object) -> tuple[bytes, HttpSource]:
    parts: list[bytes] = []
    source = await download(url, parts, **kwargs)
    return b"".join(parts), source


# -- nginx ------------------------------------------------------------------------------


async def test_nginx_download_is_the_file(nginx: Nginx) -> None:
    (nginx.files / "disk.img").write_bytes(DATA)
    data, source = await fetch(f"{nginx.url}/disk.img")
    assert sha256(data) == sha256(DATA)
    assert source.length == len(DATA)
    assert source.resumes == 0
    assert source.etag and source.etag.startswith('"')  # nginx's strong ETag


async def test_nginx_behind_a_cutting_proxy_continues_with_ranges(nginx: Nginx) -> None:
    (nginx.files / "disk.img").write_bytes(DATA)
    async with CuttingProxy(nginx.port, cut_after=700_000, cuts=3) as proxy:
        data, source = await fetch(proxy.url("/disk.img"), **FAST)
    assert proxy.cut == 3
    assert source.resumes == 3
    assert len(data) == len(DATA)
    assert sha256(data) == sha256(DATA)


async def test_nginx_file_replaced_during_a_drop_starts_over(nginx: Nginx) -> None:
    path = nginx.files / "disk.img"
    path.write_bytes(DATA)

    async def replace() -> None:
        path.write_bytes(os.urandom(len(DATA)))  # same size, new mtime: a new ETag
        os.utime(path, (time.time() + 100, time.time() + 100))

    received: list[bytes] = []
    async with CuttingProxy(nginx.port, cut_after=700_000, cuts=1, on_cut=replace) as proxy:
        with pytest.raises(SourceChanged) as caught:
            await download(proxy.url("/disk.img"), received, **FAST)
    message = str(caught.value)
    assert "cannot be continued" in message and "starting over" in message
    assert "200" in message  # nginx's answer to If-Range with the old ETag
    handed_out = b"".join(received)
    assert 0 < len(handed_out) < 700_000
    assert handed_out == DATA[: len(handed_out)]


async def test_nginx_404_fails_at_once(nginx: Nginx) -> None:
    started = time.monotonic()
    with pytest.raises(SourceUnreachable) as caught:
        await fetch(f"{nginx.url}/missing.img", backoff=5)
    assert "404 Not Found" in str(caught.value)
    assert not isinstance(caught.value, SourceChanged)
    assert time.monotonic() - started < 3  # no retry (the first would wait 5 s)


# -- dropped connections ------------------------------------------------------------------


async def test_several_drops_give_the_same_bytes() -> None:
    faults = Faults(drop_after=400_000, drops=4)
    async with FlakyServer(DATA, faults) as server:
        data, source = await fetch(server.url, **FAST)
    assert sha256(data) == sha256(DATA)
    assert source.resumes == 4
    ranges = server.range_requests()
    assert [r.headers["range"] for r in ranges] == [f"bytes={n * 400_000}-" for n in range(1, 5)]
    assert {r.headers["if-range"] for r in ranges} == {'"v1"'}
    assert {r.headers.get("accept-encoding") for r in server.requests} == {"identity"}


async def test_drops_are_logged_with_the_offset(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="importer.sources.http")
    async with FlakyServer(DATA, Faults(drop_after=500_000, drops=1)) as server:
        data, source = await fetch(server.url, **FAST)
    assert data == DATA and source.resumes == 1
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(messages) == 1
    assert "broke off" in messages[0] and "at byte 500000" in messages[0]


async def test_last_modified_is_the_validator_without_an_etag() -> None:
    faults = Faults(etag=None, drop_after=1_000_000, drops=1)
    async with FlakyServer(DATA, faults) as server:
        data, source = await fetch(server.url, **FAST)
    assert data == DATA and source.resumes == 1
    assert server.range_requests()[0].headers["if-range"] == faults.last_modified


async def test_a_weak_etag_leaves_last_modified_as_the_validator() -> None:
    faults = Faults(etag='W/"v1"', drop_after=1_000_000, drops=1)
    async with FlakyServer(DATA, faults) as server:
        data, source = await fetch(server.url, **FAST)
    assert data == DATA and source.resumes == 1
    assert source.etag is None
    assert server.range_requests()[0].headers["if-range"] == faults.last_modified


async def test_a_stalled_body_is_continued_after_the_read_timeout() -> None:
    faults = Faults(drop_after=600_000, drops=1, stall=True)
    async with FlakyServer(DATA, faults) as server:
        data, source = await fetch(server.url, read_timeout=0.5, **FAST)
    assert data == DATA
    assert source.resumes == 1
    assert server.range_requests()[0].headers["range"] == "bytes=600000-"


async def test_short_ranges_are_continued_until_the_end() -> None:
    faults = Faults(drop_after=100_000, drops=1, max_range=1_000_000)
    async with FlakyServer(DATA, faults) as server:
        data, source = await fetch(server.url, **FAST)
    assert data == DATA
    # 100 000 bytes, then 206 answers of at most 1 000 000 bytes each
    assert source.resumes == -(-(len(DATA) - 100_000) // 1_000_000)


async def test_continuations_go_to_the_url_given_not_the_redirect() -> None:
    faults = Faults(redirect_from="/latest", drop_after=300_000, drops=1)
    async with FlakyServer(DATA, faults) as server:
        data, source = await fetch(server.url_of("/latest"), **FAST)
    assert data == DATA and source.resumes == 1
    assert [(r.path, r.headers.get("range")) for r in server.requests] == [
        ("/latest", None),
        ("/file", None),
        ("/latest", "bytes=300000-"),
        ("/file", "bytes=300000-"),
    ]


async def test_a_drop_before_any_byte_is_checked_with_a_range_from_zero() -> None:
    async with FlakyServer(DATA, Faults(drop_after=0, drops=2)) as server:
        data, source = await fetch(server.url, **FAST)
    assert data == DATA and source.resumes == 2
    assert [r.headers["range"] for r in server.range_requests()] == ["bytes=0-", "bytes=0-"]


async def test_drops_without_progress_use_up_the_retries() -> None:
    async with FlakyServer(DATA, Faults(drop_after=0, drops=100)) as server:
        with pytest.raises(SourceUnreachable) as caught:
            await fetch(server.url, retries=2, **FAST)
    message = str(caught.value)
    assert "after 3 attempts" in message and "broke off" in message
    assert not isinstance(caught.value, SourceChanged)
    assert len(server.requests) == 3


# -- downloads that cannot be continued ----------------------------------------------------


async def expect_start_over(faults: Faults, data: bytes = DATA) -> tuple[str, FlakyServer]:
    received: list[bytes] = []
    async with FlakyServer(data, faults) as server:
        with pytest.raises(SourceChanged) as caught:
            await download(server.url, received, **FAST)
    assert isinstance(caught.value, SourceUnreachable) and isinstance(caught.value, StartOver)
    handed_out = b"".join(received)
    assert handed_out == data[: len(handed_out)]
    message = str(caught.value)
    assert "cannot be continued" in message and message.endswith("starting over")
    return message, server


async def test_no_range_support_starts_over() -> None:
    message, server = await expect_start_over(Faults(ranges=False, drop_after=500_000, drops=1))
    assert "Accept-Ranges" in message and "at byte 500000" in message
    assert server.range_requests() == []  # not even tried


async def test_a_changed_file_starts_over() -> None:
    faults = Faults(drop_after=500_000, drops=1, changed=os.urandom(len(DATA)))
    message, server = await expect_start_over(faults)
    assert "200" in message  # If-Range did not match: the whole new file
    assert server.range_requests()[0].headers["if-range"] == '"v1"'


async def test_a_changed_etag_in_a_206_starts_over() -> None:
    faults = Faults(
        drop_after=500_000, drops=1, changed=os.urandom(len(DATA)), ignore_if_range=True
    )
    message, _ = await expect_start_over(faults)
    assert 'the ETag changed from "v1" to "v2"' in message


async def test_a_weak_etag_alone_cannot_be_checked() -> None:
    message, server = await expect_start_over(
        Faults(etag='W/"v1"', last_modified=None, drop_after=500_000, drops=1)
    )
    assert "neither a strong ETag nor Last-Modified" in message
    assert server.range_requests() == []


async def test_a_wrong_content_range_starts_over() -> None:
    message, _ = await expect_start_over(Faults(drop_after=500_000, drops=1, range_shift=10))
    assert "Content-Range 'bytes 500010-" in message


async def test_an_unknown_length_starts_over() -> None:
    message, _ = await expect_start_over(Faults(chunked=True, drop_after=500_000, drops=1))
    assert "did not send its length" in message


async def test_an_unknown_length_without_a_drop_is_read_to_the_end() -> None:
    async with FlakyServer(DATA, Faults(chunked=True)) as server:
        data, source = await fetch(server.url)
    assert source.length is None
    assert data == DATA


# -- connecting -----------------------------------------------------------------------------


async def test_503_twice_then_the_file(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="importer.sources.http")
    async with FlakyServer(DATA, Faults(statuses=[503, 503])) as server:
        data, source = await fetch(server.url, **FAST)
    assert data == DATA and source.resumes == 0
    assert len(server.requests) == 3
    retries = [r.getMessage() for r in caplog.records if "503" in r.getMessage()]
    assert len(retries) == 2
    assert "retry 1 of 5" in retries[0] and "retry 2 of 5" in retries[1]


async def test_502_and_504_answered_mid_download_are_retried() -> None:
    # The first answer breaks off; the continuations are refused twice, then taken.
    faults = Faults(drop_after=500_000, drops=1, range_statuses=[502, 504])
    async with FlakyServer(DATA, faults) as server:
        data, source = await fetch(server.url, **FAST)
    assert data == DATA and source.resumes == 1
    assert [r.headers.get("range") for r in server.requests][1:] == ["bytes=500000-"] * 3


async def test_503_forever_gives_up_with_the_count_and_the_cause() -> None:
    async with FlakyServer(DATA, Faults(statuses=[503] * 10)) as server:
        with pytest.raises(SourceUnreachable) as caught:
            await fetch(server.url, retries=3, **FAST)
    assert "after 4 attempts" in str(caught.value)
    assert "503 Service Unavailable" in str(caught.value)
    assert len(server.requests) == 4


@pytest.mark.parametrize("status", [403, 404, 410, 500])
async def test_client_errors_fail_at_once(status: int) -> None:
    async with FlakyServer(DATA, Faults(statuses=[status])) as server:
        with pytest.raises(SourceUnreachable) as caught:
            await fetch(server.url, backoff=5)
    assert f"answered {status} " in str(caught.value)
    assert len(server.requests) == 1


async def test_connection_refused_is_retried_then_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="importer.sources.http")
    url = f"http://127.0.0.1:{closed_port()}/image.img"
    with pytest.raises(SourceUnreachable) as caught:
        await fetch(url, retries=2, **FAST)
    message = str(caught.value)
    assert "after 3 attempts" in message and "cannot reach" in message
    assert sum("cannot reach" in r.getMessage() for r in caplog.records) == 2


async def test_zero_retries_means_one_attempt() -> None:
    url = f"http://127.0.0.1:{closed_port()}/image.img"
    with pytest.raises(SourceUnreachable, match="after 1 attempt: cannot reach"):
        await fetch(url, retries=0)


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, bytes]:
    """A server context with a certificate for 127.0.0.1, and the PEM of its CA."""
    ca = make_ca()
    leaf = make_server_cert(ca)
    (tmp_path / "cert.pem").write_bytes(leaf.cert_pem)
    (tmp_path / "key.pem").write_bytes(leaf.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context, ca.cert_pem


async def test_https_with_the_ca_bundle_continues_after_a_drop(
    tls: tuple[ssl.SSLContext, bytes],
) -> None:
    context, ca_pem = tls
    async with FlakyServer(DATA, Faults(drop_after=800_000, drops=2), context) as server:
        data, source = await fetch(server.url, ca_bundle=ca_pem, **FAST)
    assert sha256(data) == sha256(DATA)
    assert source.resumes == 2


async def test_https_with_an_unknown_ca_fails_at_once(tls: tuple[ssl.SSLContext, bytes]) -> None:
    context, _ = tls
    started = time.monotonic()
    async with FlakyServer(DATA, Faults(), context) as server:
        with pytest.raises(SourceUnreachable) as caught:
            await fetch(server.url, backoff=5)
    message = str(caught.value)
    assert "TLS" in message and "certificate verify failed" in message
    assert server.requests == []
    assert time.monotonic() - started < 3  # no retry
