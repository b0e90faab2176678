"""tus-js-client (Node.js; what Uppy uploads with) against the upload URLs of a real
server: given the URL as its `endpoint` it creates there (POST) and follows `Location`;
given it as `uploadUrl` it asks `HEAD` for the offset and PATCHes from there. An upload
aborted midway continues, in a new run, from where the server stands.

tus-js-client is installed by npm outside the repository (tests/nodeclients.py); without
node and npm these tests fail and say what to install."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from diskimages import MiB, qemu_convert, sha256_file, write_disk_image
from nodeclients import NodeMissing, TusJsRun, install_tus_js, run_tus_js
from serverproc import Server, manifest

PVC = "PersistentVolumeClaim"
DVCR = "ContainerRegistry"
CHUNK = 2 * MiB


@dataclass
class Disk:
    path: Path  # the qcow2 file uploaded
    size: int
    sha256: str  # of the qcow2 file, the image's checksum
    raw_sha256: str  # of the disk it holds, what a claim's disk.img holds


@pytest.fixture(scope="module")
def tus_js() -> Path:
    try:
        return install_tus_js()
    except NodeMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    """A qcow2 of about 10 MiB made by qemu-img: five or more PATCHes of CHUNK."""
    directory = tmp_path_factory.mktemp("tus-js-disk")
    raw = directory / "disk.raw"
    raw_sha256, _ = write_disk_image(raw, 16 * MiB, seed=7)
    image = qemu_convert(raw, "qcow2", directory / "disk.qcow2")
    size = image.stat().st_size
    assert size > 4 * CHUNK
    return Disk(image, size, sha256_file(image), raw_sha256)


def assert_ready(server: Server, name: str, disk: Disk, storage: str) -> None:
    status = server.get(name)["status"]
    assert status["phase"] == "Ready", status
    assert status["checksum"]["sha256"] == disk.sha256
    assert status["format"] == "qcow2"
    if storage == PVC:
        assert sha256_file(server.claim_dir(name) / "disk.img") == disk.raw_sha256


def assert_succeeded(run: TusJsRun) -> None:
    assert run.returncode == 0 and run.outcome["event"] == "success", str(run)


@pytest.mark.parametrize("storage", [PVC, DVCR])
def test_endpoint_flow_creates_at_the_upload_url_then_patches(
    server: Server, tus_js: Path, disk: Disk, storage: str
) -> None:
    server.create(manifest("endpoint", storage=storage))
    url = server.upload_url("endpoint")
    run = run_tus_js(tus_js, file=str(disk.path), endpoint=url, chunkSize=CHUNK)
    assert_succeeded(run)

    (post,) = run.of("request", "POST")
    assert post["length"] == str(disk.size) and post["deferLength"] is None
    (created,) = run.of("response", "POST")
    assert (created["status"], created["location"]) == (201, url)
    patches = run.of("request", "PATCH")
    assert len(patches) >= 5, str(run)
    assert {p["url"] for p in patches} == {url}
    assert [int(p["offset"]) for p in patches] == list(range(0, disk.size, CHUNK))
    assert all(p["length"] is None for p in patches)  # the creation gave it
    assert_ready(server, "endpoint", disk, storage)


@pytest.mark.parametrize("storage", [PVC, DVCR])
def test_endpoint_flow_with_data_during_creation(
    server: Server, tus_js: Path, disk: Disk, storage: str
) -> None:
    """uploadDataDuringCreation: the creation POST carries the first chunk."""
    server.create(manifest("with-data", storage=storage))
    url = server.upload_url("with-data")
    run = run_tus_js(
        tus_js, file=str(disk.path), endpoint=url, chunkSize=CHUNK, dataDuringCreation=True
    )
    assert_succeeded(run)
    (created,) = run.of("response", "POST")
    assert (created["status"], created["location"], created["offset"]) == (201, url, str(CHUNK))
    patches = run.of("request", "PATCH")
    assert [int(p["offset"]) for p in patches] == list(range(CHUNK, disk.size, CHUNK))
    assert_ready(server, "with-data", disk, storage)


def test_endpoint_flow_with_a_deferred_length(server: Server, tus_js: Path, disk: Disk) -> None:
    """uploadLengthDeferred: the creation says Upload-Defer-Length: 1, the last PATCH
    brings Upload-Length."""
    server.create(manifest("deferred"))
    url = server.upload_url("deferred")
    run = run_tus_js(tus_js, file=str(disk.path), endpoint=url, chunkSize=CHUNK, deferred=True)
    assert_succeeded(run)
    (post,) = run.of("request", "POST")
    assert (post["deferLength"], post["length"]) == ("1", None)
    patches = run.of("request", "PATCH")
    assert len(patches) >= 5
    assert patches[-1]["length"] == str(disk.size)
    assert all(p["length"] is None for p in patches[:-1])
    assert_ready(server, "deferred", disk, PVC)


def test_registry_storage_refuses_a_deferred_length_with_a_reason(
    server: Server, tus_js: Path, disk: Disk
) -> None:
    server.create(manifest("oci-deferred", storage=DVCR))
    url = server.upload_url("oci-deferred")
    run = run_tus_js(tus_js, file=str(disk.path), endpoint=url, chunkSize=CHUNK, deferred=True)
    assert run.returncode == 1 and run.outcome["event"] == "error", str(run)
    assert "411" in run.outcome["message"]
    assert "ContainerRegistry storage needs the image's length" in run.outcome["message"]
    assert not run.of("request", "PATCH")
    assert server.get("oci-deferred")["status"]["phase"] == "WaitForUserUpload"


def test_upload_url_flow_heads_then_patches(server: Server, tus_js: Path, disk: Disk) -> None:
    """Given only the upload URL of an image nobody started, tus-js-client 4 needs the
    length deferred (HEAD cannot say it): `uploadLengthDeferred` and the same header on its
    PATCHes."""
    server.create(manifest("upload-url"))
    url = server.upload_url("upload-url")
    run = run_tus_js(
        tus_js,
        file=str(disk.path),
        uploadUrl=url,
        chunkSize=CHUNK,
        deferred=True,
        headers={"Upload-Defer-Length": "1"},
    )
    assert_succeeded(run)
    assert not run.of("request", "POST")
    assert run.events[0]["event"] == "request" and run.events[0]["method"] == "HEAD"
    patches = run.of("request", "PATCH")
    assert int(patches[0]["offset"]) == 0 and len(patches) >= 5
    assert patches[-1]["length"] == str(disk.size)
    assert_ready(server, "upload-url", disk, PVC)


@pytest.mark.parametrize("storage", [PVC, DVCR])
def test_an_aborted_upload_resumes_by_its_upload_url(
    server: Server, tus_js: Path, disk: Disk, storage: str
) -> None:
    server.create(manifest("resumed", storage=storage))
    url = server.upload_url("resumed")
    # Aborted at the first progress report past two PATCHes: the third one's first 64 KiB
    # went out (tus-js-client reports the first piece of a body at once), so it is cut.
    first = run_tus_js(
        tus_js, file=str(disk.path), endpoint=url, chunkSize=CHUNK, abortAfter=2 * CHUNK + 1
    )
    assert first.returncode == 0 and first.outcome["event"] == "aborted", str(first)
    assert first.outcome["url"] == url
    accepted = max(int(r["offset"]) for r in first.of("response", "PATCH"))
    assert accepted >= 2 * CHUNK
    assert server.get("resumed")["status"]["phase"] != "Ready"

    second = run_tus_js(tus_js, file=str(disk.path), uploadUrl=url, chunkSize=CHUNK)
    assert_succeeded(second)
    assert not second.of("request", "POST")
    heads = second.of("response", "HEAD")
    assert heads and heads[0]["status"] == 200, str(second)
    resumed_at = int(heads[0]["offset"])
    assert accepted <= resumed_at < disk.size
    patches = second.of("request", "PATCH")
    assert int(patches[0]["offset"]) >= resumed_at > 0  # not from zero
    assert_ready(server, "resumed", disk, storage)


def test_an_aborted_upload_run_again_by_endpoint_continues(
    server: Server, tus_js: Path, disk: Disk
) -> None:
    """Run again with the same endpoint, tus-js-client creates anew; the creation keeps the
    bytes taken, its first PATCH (from 0) is refused with the offset, and it asks HEAD and
    goes on from there."""
    server.create(manifest("again"))
    url = server.upload_url("again")
    first = run_tus_js(
        tus_js, file=str(disk.path), endpoint=url, chunkSize=CHUNK, abortAfter=CHUNK + 1
    )
    assert first.outcome["event"] == "aborted", str(first)

    second = run_tus_js(tus_js, file=str(disk.path), endpoint=url, chunkSize=CHUNK)
    assert_succeeded(second)
    (created,) = second.of("response", "POST")
    assert created["status"] == 201 and int(created["offset"]) >= CHUNK
    requests = second.of("request")
    heads = [i for i, r in enumerate(requests) if r["method"] == "HEAD"]
    assert heads, str(second)
    after = [r for r in requests[heads[0] :] if r["method"] == "PATCH"]
    assert after and int(after[0]["offset"]) >= CHUNK, str(second)
    assert_ready(server, "again", disk, PVC)
