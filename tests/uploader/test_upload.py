"""Uploads end to end: a real server process, real curl, real files."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from diskimages import MiB, sha256_file, write_disk_image
from serverproc import Server, background_upload, curl, head_offset, manifest
from waiting import wait_until


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_curl_upload_is_stored_sparse_with_checksum(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, zero_ranges = write_disk_image(image, 256 * MiB, seed=1)
    server.create(manifest("disk"))
    url = server.upload_url("disk")

    code, body = curl("-T", str(image), url)

    assert code == 200, body
    assert body["phase"] == "Ready"
    obj = server.get("disk")
    status = obj["status"]
    assert status["phase"] == "Ready"
    assert status["progress"] == "100%"
    assert status["checksum"] == {"sha256": sha256}
    assert status["format"] == "raw"
    assert status["cdrom"] is False
    assert status["size"]["unpackedBytes"] == str(256 * MiB)
    assert status["target"] == {"persistentVolumeClaimName": "vi-disk"}
    assert status["conditions"][0]["type"] == "Ready"
    assert status["conditions"][0]["status"] == "True"
    disk = server.claim_dir("disk") / "disk.img"
    assert disk.stat().st_size == 256 * MiB
    assert sha256_file(disk) == sha256
    zero_bytes = sum(length for _, length in zero_ranges)
    assert zero_bytes >= 32 * MiB
    # Every zero range is a hole: allocation is the data, not the zeros.
    assert allocated(disk) <= 256 * MiB - zero_bytes + MiB
    assert int(status["size"]["storedBytes"]) == allocated(disk)
    assert list(server.claim_dir("disk").iterdir()) == [disk]


def test_chunked_upload_from_a_pipe(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 40 * MiB, seed=2)
    server.create(manifest("piped"))
    url = server.upload_url("piped")

    code, body = curl("-T", "-", url, stdin=image.read_bytes())

    assert code == 200, body
    obj = server.get("piped")
    assert obj["status"]["checksum"]["sha256"] == sha256
    assert sha256_file(server.claim_dir("piped") / "disk.img") == sha256


def test_multipart_form_upload(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 24 * MiB, seed=3)
    server.create(manifest("form"))
    url = server.upload_url("form")

    code, body = curl("-F", "note=hello", "-F", f"file=@{image}", url)

    assert code == 200, body
    assert server.get("form")["status"]["checksum"]["sha256"] == sha256
    assert sha256_file(server.claim_dir("form") / "disk.img") == sha256


def test_multipart_without_file_part_is_refused(server: Server) -> None:
    server.create(manifest("noform"))
    url = server.upload_url("noform")
    code, body = curl("-F", "other=x", url)
    assert code == 400
    assert "file" in body["message"]


def test_dvcr_uploader_upload_command(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 32 * MiB, seed=4)
    server.create(manifest("cli"))
    url = server.upload_url("cli")

    done = subprocess.run(
        [sys.executable, "-m", "uploader.cli", "upload", str(image), url],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["phase"] == "Ready"
    assert "100%" in done.stderr  # the progress bar reached the end
    assert server.get("cli")["status"]["checksum"]["sha256"] == sha256


def test_upload_command_reports_refusal_with_exit_code(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * 4096)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "uploader.cli",
            "upload",
            "-q",
            str(image),
            server.url + "/upload/nope",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "404" in done.stderr


def test_wrong_token_is_404_without_reading_the_body(server: Server, tmp_path: Path) -> None:
    server.create(manifest("tok"))
    url = server.upload_url("tok")
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(MiB))
    code, body = curl("-T", str(image), url[:-4] + "AAAA")
    assert code == 404
    assert body["reason"] == "NotFound"
    code, _ = curl("-T", str(image), server.url + "/upload/")
    assert code == 404
    # The real token still works afterwards.
    code, _ = curl("-T", str(image), url)
    assert code == 200


def test_second_upload_after_ready_is_409(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(2 * MiB))
    server.create(manifest("once"))
    url = server.upload_url("once")
    assert curl("-T", str(image), url)[0] == 200
    before = sha256_file(server.claim_dir("once") / "disk.img")

    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(2 * MiB))
    code, body = curl("-T", str(other), url)

    assert code == 409
    assert "Ready" in body["message"]
    assert sha256_file(server.claim_dir("once") / "disk.img") == before
    head = subprocess.run(["curl", "-sS", "-I", url], capture_output=True, text=True).stdout
    assert "upload-offset: 2097152" in head.lower()
    assert "upload-length: 2097152" in head.lower()


def test_two_requests_at_once_for_one_image(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 16 * MiB, seed=5)
    server.create(manifest("busy"))
    url = server.upload_url("busy")
    slow = background_upload(image, url, "4M")
    server.wait_phase("busy", ("Provisioning",))

    code, body = curl("-T", str(image), url)

    assert code == 409
    assert "in progress" in body["message"]
    assert slow.communicate(timeout=60)[0] == b"200"
    assert server.get("busy")["status"]["checksum"]["sha256"] == sha256


def test_checksum_mismatch_fails_and_leaves_no_data(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(8 * MiB))
    real_md5 = hashlib.md5(image.read_bytes()).hexdigest()
    server.create(manifest("bad", checksum={"sha256": "0" * 64, "md5": real_md5}))
    url = server.upload_url("bad")

    code, body = curl("-T", str(image), url)

    assert code == 422
    assert body["reason"] == "BadImageChecksum"
    assert "sha256" in body["message"]
    status = server.get("bad")["status"]
    assert status["phase"] == "Failed"
    assert status["conditions"][0]["reason"] == "BadImageChecksum"
    claim = server.claim_dir("bad")
    assert not claim.exists() or list(claim.iterdir()) == []
    # The upload URL of the failed image says why it failed.
    code, body = curl("-T", str(image), url)
    assert (code, body["reason"]) == (410, "BadImageChecksum")


def test_md5_and_sha256_verified_when_both_given(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    data = os.urandom(3 * MiB)
    image.write_bytes(data)
    sums = {"md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}
    server.create(manifest("good", checksum=sums))
    code, body = curl("-T", str(image), server.upload_url("good"))
    assert code == 200, body
    assert server.get("good")["status"]["checksum"] == sums


def test_eight_uploads_at_once(server: Server, tmp_path: Path) -> None:
    images = []
    for i in range(8):
        path = tmp_path / f"disk{i}.raw"
        sha256, _ = write_disk_image(path, (20 + i) * MiB, seed=10 + i)
        server.create(manifest(f"many-{i}"))
        images.append((path, sha256, server.upload_url(f"many-{i}")))
    procs = [background_upload(p, url) for p, _, url in images]
    codes = [proc.communicate(timeout=300)[0] for proc in procs]
    assert codes == [b"200"] * 8
    for i, (_, sha256, _) in enumerate(images):
        assert server.get(f"many-{i}")["status"]["checksum"]["sha256"] == sha256
        assert sha256_file(server.claim_dir(f"many-{i}") / "disk.img") == sha256


def test_an_interrupted_upload_continues_where_it_stopped(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(64 * MiB))
    server.create(manifest("cut"))
    url = server.upload_url("cut")
    proc = subprocess.Popen(["curl", "-sS", "--limit-rate", "8M", "-T", str(image), url])
    server.wait_phase("cut", ("Provisioning",))
    wait_until(lambda: head_offset(url) >= 8 * MiB, what="8 MiB uploaded")
    proc.kill()
    proc.wait()

    obj = server.wait_phase("cut", ("WaitForUserUpload",), timeout=30)
    assert "continue it" in obj["status"]["conditions"][0]["message"]
    offset = head_offset(url)
    assert 0 < offset < 64 * MiB
    assert not (server.claim_dir("cut") / "disk.img").exists()
    code, body = curl("-C", str(offset), "-T", str(image), url)
    assert code == 200, body
    assert body["checksum"]["sha256"] == sha256_file(image)
    assert sha256_file(server.claim_dir("cut") / "disk.img") == sha256_file(image)


def test_small_parts_keep_the_connection_and_a_large_body_closes_it(server: Server) -> None:
    """Bodies from 1 MiB up are received straight into the pipeline, past aiohttp's
    parser, so their connection closes after the answer (and says so); smaller parts, as
    tus clients send them, keep theirs."""
    data = os.urandom(4 * MiB)
    server.create(manifest("parts"))
    url = urlsplit(server.upload_url("parts"))
    connection = http.client.HTTPConnection(url.hostname or "", url.port)

    def patch(offset: int, end: int) -> http.client.HTTPResponse:
        headers = {
            "Tus-Resumable": "1.0.0",
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(offset),
            "Upload-Length": str(len(data)),
        }
        connection.request("PATCH", url.path, body=data[offset:end], headers=headers)
        return connection.getresponse()

    sockets = set()
    for offset in range(0, MiB, 256 << 10):
        response = patch(offset, offset + (256 << 10))
        response.read()
        assert response.status == 204
        assert response.getheader("Connection") != "close"
        sockets.add(connection.sock)
    assert len(sockets) == 1  # one connection for all four

    response = patch(MiB, len(data))
    answer = json.loads(response.read())
    assert response.status == 200, answer
    assert response.getheader("Connection") == "close"
    assert answer["phase"] == "Ready"
    assert answer["checksum"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert sha256_file(server.claim_dir("parts") / "disk.img") == hashlib.sha256(data).hexdigest()
    connection.close()


def test_a_range_at_the_wrong_offset_is_416_with_the_offset(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(MiB))
    server.create(manifest("range"))
    url = server.upload_url("range")
    out = subprocess.run(
        ["curl", "-sS", "-D", "-", "-o", "/dev/null", "-C", "4096", "-T", str(image), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert " 416" in out.splitlines()[0] or " 416" in out
    assert "upload-offset: 0" in out.lower()


def test_head_get_options_on_upload_url(server: Server, tmp_path: Path) -> None:
    server.create(manifest("probe"))
    url = server.upload_url("probe")
    head = subprocess.run(["curl", "-sS", "-I", url], capture_output=True, text=True).stdout.lower()
    assert "upload-offset: 0" in head
    assert "tus-resumable: 1.0.0" in head
    code, body = curl(url)
    assert code == 200
    assert body["phase"] == "WaitForUserUpload"
    assert body["offset"] == 0
    options = subprocess.run(
        ["curl", "-sS", "-X", "OPTIONS", "-D", "-", url], capture_output=True, text=True
    ).stdout.lower()
    assert "tus-version: 1.0.0" in options
    code, body = curl("-X", "PATCH", "-H", "Upload-Offset: 0", "--data-binary", "x", url)
    assert code == 415
    assert "application/offset+octet-stream" in body["message"]
    tus = ["-X", "PATCH", "-H", "Content-Type: application/offset+octet-stream"]
    code, body = curl(*tus, "-H", "Upload-Offset: 5", "--data-binary", "x", url)
    assert code == 409
    code, body = curl(*tus, "-H", "Upload-Offset: 0", "--data-binary", "xy", url)
    assert code == 400 and "Upload-Length" in body["message"]
    code, body = curl(*tus, "-H", "Upload-Offset: 0", "-H", "Upload-Length: 10", "-d", "xy", url)
    assert code == 204
    assert head_offset(url) == 2


def test_sigterm_mid_upload_exits_promptly(tmp_path: Path) -> None:
    with Server(tmp_path / "data").start() as srv:
        image = tmp_path / "disk.raw"
        image.write_bytes(os.urandom(64 * MiB))
        srv.create(manifest("term"))
        url = srv.upload_url("term")
        proc = subprocess.Popen(["curl", "-sS", "--limit-rate", "4M", "-T", str(image), url])
        srv.wait_phase("term", ("Provisioning",))
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 10
        proc.wait(timeout=30)
        srv.start()
        obj = srv.get("term")
        assert obj["status"]["phase"] == "WaitForUserUpload"
        # The stop saved a checkpoint of all it took: the upload continues from there.
        offset = head_offset(url)
        assert offset > 0
        code, body = curl("-C", str(offset), "-T", str(image), url)
        assert code == 200, body
        assert sha256_file(srv.claim_dir("term") / "disk.img") == sha256_file(image)


def test_body_over_the_limit_is_413(tmp_path: Path) -> None:
    with Server(tmp_path / "data", "--max-image-size", "4Mi").start() as srv:
        srv.create(manifest("big"))
        url = srv.upload_url("big")
        image = tmp_path / "disk.raw"
        image.write_bytes(os.urandom(5 * MiB))
        code, body = curl("-T", str(image), url)
        assert code == 413
        # Without a length up front the limit is enforced while streaming.
        code, body = curl("-T", "-", url, stdin=image.read_bytes())
        assert code == 413
        assert body["reason"] == "ImageTooLarge"
        assert srv.get("big")["status"]["phase"] == "Failed"
        assert not (srv.claim_dir("big") / "disk.img").exists()


def test_restart_keeps_images_and_data(tmp_path: Path) -> None:
    with Server(tmp_path / "data").start() as srv:
        image = tmp_path / "disk.raw"
        sha256, _ = write_disk_image(image, 16 * MiB, seed=7)
        srv.create(manifest("kept"))
        assert curl("-T", str(image), srv.upload_url("kept"))[0] == 200
        srv.create(manifest("waiting"))
        waiting_url = srv.upload_url("waiting")
        big = tmp_path / "big.raw"
        big.write_bytes(os.urandom(64 * MiB))
        srv.create(manifest("midway"))
        midway_url = srv.upload_url("midway")
        proc = subprocess.Popen(["curl", "-sS", "--limit-rate", "8M", "-T", str(big), midway_url])
        srv.wait_phase("midway", ("Provisioning",))
        wait_until(lambda: head_offset(midway_url) >= 2 * MiB, what="2 MiB uploaded")
        before = srv.get("kept")

        srv.restart(sig=9)  # no chance to clean up
        proc.wait(timeout=30)

        after = srv.get("kept")
        assert after["status"] == before["status"]
        assert after["metadata"]["uid"] == before["metadata"]["uid"]
        assert sha256_file(srv.claim_dir("kept") / "disk.img") == sha256
        assert srv.get("waiting")["status"]["phase"] == "WaitForUserUpload"
        midway = srv.get("midway")
        assert midway["status"]["phase"] == "WaitForUserUpload"
        assert list(srv.claim_dir("midway").iterdir()) == []
        # Both upload URLs still work after the restart.
        assert curl("-T", str(image), waiting_url)[0] == 200
        assert curl("-T", str(big), midway["status"]["imageUploadURLs"]["external"])[0] == 200
        assert sha256_file(srv.claim_dir("midway") / "disk.img") == sha256_file(big)


def test_backpressure_keeps_memory_bounded(tmp_path: Path) -> None:
    """A slow sink must slow the sender, not fill the server's memory."""
    rate = 256 * MiB  # bytes per second the sink accepts (deliberately slowed)
    with Server(tmp_path / "data", env={"DVCR_FAULT_SINK_BYTES_PER_SEC": str(rate)}).start() as srv:
        image = tmp_path / "disk.raw"
        size = 1024 * MiB
        with open(image, "wb") as f:
            block = os.urandom(4 * MiB)
            for _ in range(size // len(block)):
                f.write(block)
        srv.create(manifest("slow"))
        url = srv.upload_url("slow")
        baseline = srv.rss()
        peak_during: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak_during.append(srv.rss())
                time.sleep(0.05)  # the pace of the samples, not a wait for a state

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        code, _ = curl("-T", str(image), url)
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()

        assert code == 200
        assert elapsed >= size / rate * 0.9  # the sink really was the bottleneck
        growth = max(srv.peak_rss(), *peak_during) - baseline
        assert growth < 96 * MiB, f"server memory grew by {growth / MiB:.0f} MiB"


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
def test_health_and_metrics(server: Server, tmp_path: Path, path: str) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(MiB))
    obj = server.create(manifest("m"))
    assert curl("-T", str(image), server.upload_url("m"))[0] == 200
    out = subprocess.run(["curl", "-sS", server.url + path], capture_output=True, text=True).stdout
    if path == "/healthz":
        assert out == "OK"
    else:
        uid = obj["metadata"]["uid"]
        assert f'registry_progress{{ownerUID="{uid}"}} 100.0' in out
        assert f'registry_average_speed{{ownerUID="{uid}"}}' in out
        assert "registry_current_speed" in out
        assert 'dvcr_transfers_total{result="succeeded"} 1.0' in out
        values = dict(
            line.rsplit(" ", 1) for line in out.splitlines() if line and not line.startswith("#")
        )
        assert float(values["dvcr_received_bytes_total"]) == MiB
        assert float(values["dvcr_written_bytes_total"]) == MiB
        assert float(values["dvcr_active_transfers"]) == 0
