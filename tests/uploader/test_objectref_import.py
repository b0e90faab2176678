"""`dataSource.type: ObjectRef`: images made from other images and from VirtualDisks."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from diskimages import MiB, qemu_convert, sha256_file, write_disk_image
from dvcrimage import check_image, skopeo_copy
from registryproc import Registry
from serverproc import API, Server, curl, manifest
from waiting import wait_until

from uploader.resources import CLUSTER_VIRTUAL_IMAGE, ready_condition


def ref_manifest(
    name: str, kind: str, source: str, storage: str = "PersistentVolumeClaim", **extra: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": "VirtualImage",
        "metadata": {"name": name},
        "spec": {
            "storage": storage,
            "dataSource": {
                "type": "ObjectRef",
                "objectRef": {"kind": kind, "name": source, **extra},
            },
        },
    }


def upload(server: Server, name: str, image: Path, storage: str) -> dict[str, Any]:
    server.create(manifest(name, storage=storage))
    code, body = curl("-T", str(image), server.upload_url(name))
    assert code == 200, body
    return server.get(name)


def ready(server: Server, name: str, timeout: float = 60) -> dict[str, Any]:
    obj = server.wait_phase(name, ("Ready", "Failed"), timeout=timeout)
    assert obj["status"]["phase"] == "Ready", obj["status"]
    return obj


def condition(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")


def waiting_because(server: Server, name: str, words: str) -> dict[str, Any]:
    """The image as soon as its Ready condition says `words` (why it waits)."""

    def says(obj: dict[str, Any]) -> bool:
        found = ready_condition(obj.get("status") or {})
        return found is not None and words in found.get("message", "")

    return server.wait_for(name, says, f"a Ready condition that says {words!r}")


def layout_blobs(server: Server) -> set[str]:
    return {p.name for p in (server.data_dir / "dvcr" / "blobs" / "sha256").iterdir()}


def registry_blob_files(registry: Registry) -> list[Path]:
    return sorted((registry.storage / "docker/registry/v2/blobs/sha256").glob("*/*/data"))


# -- DVCR to DVCR: no bytes copied -----------------------------------------------------------


def test_image_to_image_in_the_layout_shares_the_blobs(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    sha256, _ = write_disk_image(image, 16 * MiB, seed=61)
    source = upload(server, "base", image, "ContainerRegistry")
    blobs_before = layout_blobs(server)

    server.create(ref_manifest("copy", "VirtualImage", "base", storage="ContainerRegistry"))
    copy = ready(server, "copy")
    for field in ("checksum", "size", "format", "cdrom"):
        assert copy["status"][field] == source["status"][field]
    assert copy["status"]["progress"] == "100%"
    assert layout_blobs(server) == blobs_before  # not one byte stored twice
    out = tmp_path / "out"
    check_image(out, skopeo_copy(copy["status"]["target"]["registryURL"], out), sha256)

    # The copy outlives its source.
    code, _ = server.call("DELETE", server.images_path(name="base"))
    assert code == 200
    server.wait_gone("base")
    out2 = tmp_path / "out2"
    check_image(out2, skopeo_copy(copy["status"]["target"]["registryURL"], out2), sha256)


def test_image_to_image_in_a_registry_mounts_the_blobs(
    dvcr_server: Server, registry: Registry, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    sha256, _ = write_disk_image(image, 16 * MiB, seed=62)
    upload(dvcr_server, "base", image, "ContainerRegistry")
    blobs_before = registry_blob_files(registry)

    dvcr_server.create(ref_manifest("copy", "VirtualImage", "base", storage="ContainerRegistry"))
    copy = ready(dvcr_server, "copy")
    assert registry_blob_files(registry) == blobs_before  # one copy of every blob
    ref = copy["status"]["target"]["registryURL"]
    assert ref == f"{registry.host}/vi/default/copy:{copy['metadata']['uid']}"
    out = tmp_path / "out"
    check_image(out, skopeo_copy(f"docker://{ref}", out, "--src-tls-verify=false"), sha256)


def test_cluster_image_from_a_namespaced_image(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    write_disk_image(image, 8 * MiB, seed=63)
    source = upload(server, "base", image, "ContainerRegistry")
    doc = ref_manifest("shared", "VirtualImage", "base", namespace="default")
    doc["kind"] = "ClusterVirtualImage"
    del doc["spec"]["storage"]
    code, body = server.call("POST", f"{API}/clustervirtualimages", doc)
    assert code == 201, body
    obj = server.wait_phase("shared", ("Ready", "Failed"), 30, kind=CLUSTER_VIRTUAL_IMAGE)
    assert obj["status"]["phase"] == "Ready", obj["status"]
    assert obj["status"]["checksum"] == source["status"]["checksum"]
    assert ":cvi/shared:" in obj["status"]["target"]["registryURL"]


# -- through the pipeline ---------------------------------------------------------------------


def test_qcow2_in_dvcr_into_a_claim_is_converted(server: Server, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw_sha256, _ = write_disk_image(raw, 24 * MiB, seed=64)
    qcow2 = qemu_convert(raw, "qcow2", tmp_path / "disk.qcow2")
    source = upload(server, "base", qcow2, "ContainerRegistry")
    assert source["status"]["format"] == "qcow2"

    server.create(ref_manifest("disk", "VirtualImage", "base"))
    obj = ready(server, "disk")
    assert sha256_file(server.claim_dir("disk") / "disk.img") == raw_sha256
    assert obj["status"]["checksum"] == source["status"]["checksum"]  # of the qcow2 bytes
    assert obj["status"]["format"] == "qcow2"
    assert obj["status"]["size"]["unpackedBytes"] == str(24 * MiB)


def test_registry_image_into_a_claim(
    dvcr_server: Server, registry: Registry, tmp_path: Path
) -> None:
    raw = tmp_path / "disk.raw"
    raw_sha256, _ = write_disk_image(raw, 16 * MiB, seed=65)
    vmdk = qemu_convert(raw, "vmdk", tmp_path / "disk.vmdk", "-o", "subformat=streamOptimized")
    upload(dvcr_server, "base", vmdk, "ContainerRegistry")
    dvcr_server.create(ref_manifest("disk", "VirtualImage", "base"))
    ready(dvcr_server, "disk")
    assert sha256_file(dvcr_server.claim_dir("disk") / "disk.img") == raw_sha256


def test_claim_into_dvcr_and_into_another_claim(server: Server, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    write_disk_image(raw, 16 * MiB, seed=66)
    qcow2 = qemu_convert(raw, "qcow2", tmp_path / "disk.qcow2")
    upload(server, "base", qcow2, "PersistentVolumeClaim")
    raw_sha256 = sha256_file(server.claim_dir("base") / "disk.img")

    server.create(ref_manifest("in-dvcr", "VirtualImage", "base", storage="ContainerRegistry"))
    server.create(ref_manifest("in-pvc", "VirtualImage", "base"))
    in_dvcr = ready(server, "in-dvcr")
    ready(server, "in-pvc")
    assert in_dvcr["status"]["format"] == "raw"
    assert in_dvcr["status"]["checksum"]["sha256"] == raw_sha256
    out = tmp_path / "out"
    check_image(out, skopeo_copy(in_dvcr["status"]["target"]["registryURL"], out), raw_sha256)
    assert sha256_file(server.claim_dir("in-pvc") / "disk.img") == raw_sha256


# -- waiting for the source -------------------------------------------------------------------


def test_waits_in_pending_until_the_source_is_ready(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    sha256, _ = write_disk_image(image, 8 * MiB, seed=67)
    server.create(manifest("base", storage="ContainerRegistry"))
    url = server.upload_url("base")
    server.create(ref_manifest("later", "VirtualImage", "base"))
    waiting = waiting_because(server, "later", "WaitForUserUpload")
    assert waiting["status"]["phase"] == "Pending"
    assert condition(waiting)["reason"] == "ProvisioningNotStarted"
    assert 'VirtualImage "base"' in condition(waiting)["message"]
    assert "WaitForUserUpload" in condition(waiting)["message"]

    code, body = curl("-T", str(image), url)
    assert code == 200, body
    ready(server, "later")
    assert sha256_file(server.claim_dir("later") / "disk.img") == sha256


@pytest.mark.parametrize("kind", ["VirtualImage", "ClusterVirtualImage", "VirtualDisk"])
def test_a_missing_source_fails_the_image(server: Server, kind: str) -> None:
    server.create(ref_manifest("orphan", kind, "nowhere"))
    obj = server.wait_phase("orphan", ("Ready", "Failed"))
    assert obj["status"]["phase"] == "Failed"
    assert condition(obj)["reason"] == "SourceUnreachable"
    assert f'{kind} "nowhere"' in condition(obj)["message"]
    assert "does not exist" in condition(obj)["message"]


def test_a_failed_source_fails_the_image(server: Server, tmp_path: Path) -> None:
    server.create(manifest("base", storage="ContainerRegistry", checksum={"sha256": "3" * 64}))
    url = server.upload_url("base")
    server.create(ref_manifest("later", "VirtualImage", "base"))
    bad = tmp_path / "disk.img"
    bad.write_bytes(os.urandom(MiB))
    code, _ = curl("-T", str(bad), url)
    assert code == 422
    obj = server.wait_phase("later", ("Ready", "Failed"))
    assert obj["status"]["phase"] == "Failed"
    assert "BadImageChecksum" in condition(obj)["message"]


# -- VirtualDisks -----------------------------------------------------------------------------


def holds_open(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())


def virtual_disk(server: Server, name: str, size: int, seed: int) -> tuple[Path, str]:
    directory = server.data_dir / "pvc" / "default" / f"vd-{name}"
    directory.mkdir(parents=True)
    sha256, _ = write_disk_image(directory / "disk.img", size, seed=seed)
    return directory / "disk.img", sha256


def test_a_disk_in_use_by_qemu_waits_until_it_is_free(server: Server) -> None:
    path, sha256 = virtual_disk(server, "vm-disk", 8 * MiB, seed=68)
    # A real qemu holding the disk open for writing, as a running VM does.
    qemu = subprocess.Popen(
        ["qemu-io", "-f", "raw", str(path)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: holds_open(qemu.pid, path), what="qemu to open the disk")
        server.create(ref_manifest("snapshot", "VirtualDisk", "vm-disk"))
        waiting = waiting_because(server, "snapshot", "qemu")
        assert waiting["status"]["phase"] == "Pending"
        assert "qemu" in condition(waiting)["message"]
        assert 'VirtualDisk "vm-disk"' in condition(waiting)["message"]
    finally:
        assert qemu.stdin is not None
        qemu.stdin.write(b"quit\n")
        qemu.stdin.close()
        qemu.wait(10)
    ready(server, "snapshot")
    assert sha256_file(server.claim_dir("snapshot") / "disk.img") == sha256


def test_a_disk_with_a_write_lock_waits_and_is_held_while_read(
    tmp_path: Path,
) -> None:
    # The import is slowed so the test can see it hold the disk against a starting VM.
    srv = Server(tmp_path / "data", env={"DVCR_FAULT_SINK_BYTES_PER_SEC": str(8 * MiB)}).start()
    try:
        path, sha256 = virtual_disk(srv, "vm-disk", 24 * MiB, seed=69)
        holder = subprocess.Popen(
            [
                "python3",
                "-c",
                "import fcntl,sys,time; f=open(sys.argv[1],'r+b'); fcntl.lockf(f, fcntl.LOCK_EX);"
                "print('locked', flush=True); sys.stdin.read()",
                str(path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        srv.create(ref_manifest("copy", "VirtualDisk", "vm-disk"))
        waiting = waiting_because(srv, "copy", "write lock")
        assert waiting["status"]["phase"] == "Pending"
        assert "write lock" in condition(waiting)["message"]
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)

        srv.wait_phase("copy", ("Provisioning",))
        vm = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4k", str(path)], capture_output=True, text=True
        )
        assert vm.returncode != 0 and "lock" in vm.stderr  # a VM cannot start writing now
        ready(srv, "copy")
        assert sha256_file(srv.claim_dir("copy") / "disk.img") == sha256
        vm = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", str(path)])
        assert vm.returncode == 0  # and can once the import is done
    finally:
        srv.stop()


# -- deleting a source --------------------------------------------------------------------


def test_deleting_a_source_in_use_waits_in_terminating(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", env={"DVCR_FAULT_SINK_BYTES_PER_SEC": str(8 * MiB)}).start()
    try:
        image = tmp_path / "disk.img"
        sha256, _ = write_disk_image(image, 24 * MiB, seed=70)
        upload(srv, "base", image, "ContainerRegistry")
        srv.create(ref_manifest("disk", "VirtualImage", "base"))
        srv.wait_phase("disk", ("Provisioning",))

        code, body = srv.call("DELETE", srv.images_path(name="base"))
        assert code == 200, body
        assert body["status"]["phase"] == "Terminating"
        time.sleep(0.5)  # time for a deletion that did not wait for its user to go ahead
        assert srv.get("base")["status"]["phase"] == "Terminating"
        code, body = srv.call("PUT", srv.images_path(name="base"), manifest("base"))
        assert code == 422 and body["reason"] == "SpecImmutable"

        ready(srv, "disk")
        assert sha256_file(srv.claim_dir("disk") / "disk.img") == sha256
        srv.wait_gone("base")
        index = json.loads((srv.data_dir / "dvcr" / "index.json").read_text())
        assert index["manifests"] == []
        # A new image cannot use a source that is going away.
        srv.create(ref_manifest("late", "VirtualImage", "base"))
        late = srv.wait_phase("late", ("Ready", "Failed"))
        assert late["status"]["phase"] == "Failed"
    finally:
        srv.stop()


def test_deleting_a_pending_image_stops_its_wait(server: Server) -> None:
    server.create(manifest("base", storage="ContainerRegistry"))
    server.create(ref_manifest("later", "VirtualImage", "base"))
    server.wait_phase("later", ("Pending",))
    code, _ = server.call("DELETE", server.images_path(name="later"))
    assert code == 200
    server.wait_gone("later")
    code, _ = server.call("DELETE", server.images_path(name="base"))
    assert code == 200
    server.wait_gone("base")
