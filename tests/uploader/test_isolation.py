"""A VirtualImage stays in its namespace and its names stay valid; imports reach only the
addresses they may; source URLs never show their credentials. Real server, nginx, curl,
docker-registry and skopeo."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from diskimages import MiB, sha256_file, write_disk_image
from dvcrimage import check_image, skopeo_copy
from nginxproc import Nginx
from serverproc import API, Server, curl, free_port, manifest

LONG_NAME = ("a--b.c" * 22)[:127] + "z"  # 128 characters, dots and double dashes
LONG_NAMESPACE = "n" * 62 + "s"  # 63 characters


def http_manifest(name: str, url: str) -> dict[str, Any]:
    doc = manifest(name)
    doc["spec"]["dataSource"] = {"type": "HTTP", "http": {"url": url}}
    return doc


def ref_manifest(name: str, kind: str, source: str, **extra: Any) -> dict[str, Any]:
    doc = manifest(name)
    doc["spec"]["dataSource"] = {
        "type": "ObjectRef",
        "objectRef": {"kind": kind, "name": source, **extra},
    }
    return doc


def condition(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")


def refused(server: Server, doc: dict[str, Any], namespace: str = "default") -> str:
    """POSTs `doc`, expects 422 Invalid with nothing created; returns the message."""
    code, body = server.call("POST", server.images_path(namespace), doc)
    assert code == 422, body
    assert body["reason"] == "Invalid"
    assert server.call("GET", server.images_path(namespace))[1]["items"] == []
    return body["message"]


def upload_file(server: Server, name: str, image: Path, namespace: str = "default") -> None:
    code, body = curl("-T", str(image), server.upload_url(name, namespace))
    assert code == 200, body


# -- names ----------------------------------------------------------------------------------


def test_a_name_too_long_for_a_claim_is_refused_before_anything_is_made(server: Server) -> None:
    name = "a" * 253
    message = refused(server, manifest(name))
    assert message.startswith("metadata.name: Invalid value: ")
    assert "no more than 128 characters" in message
    assert not (server.data_dir / "pvc" / "default").exists()
    for method in ("GET", "DELETE"):
        code, body = server.call(method, server.images_path(name=name))
        assert code in (404, 422), body
    server.restart()
    assert server.call("GET", server.images_path())[0] == 200


@pytest.mark.parametrize("namespace", ["..%2F..%2Ftmp", "UPPER", "n" * 64])
def test_a_namespace_in_the_path_is_validated(server: Server, namespace: str) -> None:
    path = f"{API}/namespaces/{namespace}/virtualimages"
    code, body = server.call("POST", path, manifest("x"))
    assert code == 422, body
    assert "metadata.namespace" in body["message"]
    for method, where in (("GET", path), ("GET", f"{path}/x"), ("DELETE", f"{path}/x")):
        code, body = server.call(method, where)
        assert code in (404, 422), (method, where, body)


def test_the_longest_names_work_in_a_claim_and_in_the_layout(
    server: Server, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    sha256, _ = write_disk_image(image, MiB, seed=91)
    for storage in ("PersistentVolumeClaim", "ContainerRegistry"):
        server.create(manifest(LONG_NAME, storage=storage), LONG_NAMESPACE)
        upload_file(server, LONG_NAME, image, LONG_NAMESPACE)
        obj = server.wait_phase(LONG_NAME, ("Ready", "Failed"), namespace=LONG_NAMESPACE)
        assert obj["status"]["phase"] == "Ready", obj["status"]
        if storage == "PersistentVolumeClaim":
            claim = server.claim_dir(LONG_NAME, LONG_NAMESPACE)
            assert sha256_file(claim / "disk.img") == sha256
            assert obj["status"]["target"] == {"persistentVolumeClaimName": claim.name}
        else:
            ref = obj["status"]["target"]["registryURL"]
            assert f"vi/{LONG_NAMESPACE}/{LONG_NAME}:" in ref
            out = tmp_path / "out"
            check_image(out, skopeo_copy(ref, out), sha256)
        code, _ = server.call("DELETE", server.images_path(LONG_NAMESPACE, LONG_NAME))
        assert code == 200
        server.wait_gone(LONG_NAME, namespace=LONG_NAMESPACE)


def test_the_longest_names_work_in_docker_registry(dvcr_server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    sha256, _ = write_disk_image(image, MiB, seed=92)
    dvcr_server.create(manifest(LONG_NAME, storage="ContainerRegistry"), LONG_NAMESPACE)
    upload_file(dvcr_server, LONG_NAME, image, LONG_NAMESPACE)
    obj = dvcr_server.wait_phase(LONG_NAME, ("Ready", "Failed"), namespace=LONG_NAMESPACE)
    assert obj["status"]["phase"] == "Ready", obj["status"]
    ref = obj["status"]["target"]["registryURL"]
    assert len(ref.rpartition(":")[0]) <= 255
    out = tmp_path / "out"
    check_image(out, skopeo_copy(f"docker://{ref}", out, "--src-tls-verify=false"), sha256)


# -- namespaces -----------------------------------------------------------------------------


def test_an_object_ref_cannot_name_a_path(server: Server, tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "vd-x"
    outside.mkdir(parents=True)
    write_disk_image(outside / "disk.img", MiB, seed=93)
    doc = ref_manifest("stolen", "VirtualDisk", "x", namespace=str(tmp_path / "outside"))
    message = refused(server, doc)
    assert message.startswith("spec.dataSource.objectRef.namespace: Invalid value")


@pytest.mark.parametrize("value", [5, ["victim"], {"name": "victim"}, True])
def test_an_object_ref_namespace_of_the_wrong_type_is_invalid(server: Server, value: Any) -> None:
    message = refused(server, ref_manifest("x", "VirtualImage", "base", namespace=value))
    assert message.startswith("spec.dataSource.objectRef.namespace: ")


def test_a_virtual_image_reads_only_its_own_namespace(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    write_disk_image(image, 2 * MiB, seed=94)
    server.create(manifest("secret-img"), "victim")
    upload_file(server, "secret-img", image, "victim")
    secret = server.wait_phase("secret-img", ("Ready",), namespace="victim")

    for kind in ("VirtualImage", "VirtualDisk"):
        doc = ref_manifest("copy", kind, "secret-img", namespace="victim")
        message = refused(server, doc, "attacker")
        assert message.startswith("spec.dataSource.objectRef.namespace: Forbidden: ")

    # Its own namespace, named or not, is fine.
    server.create(ref_manifest("copy", "VirtualImage", "secret-img", namespace="victim"), "victim")
    server.create(ref_manifest("copy2", "VirtualImage", "secret-img"), "victim")
    for name in ("copy", "copy2"):
        copy = server.wait_phase(name, ("Ready", "Failed"), namespace="victim")
        assert copy["status"]["phase"] == "Ready", copy["status"]
        assert copy["status"]["checksum"] == secret["status"]["checksum"]


def test_an_image_pull_secret_of_another_namespace_is_forbidden(server: Server) -> None:
    secrets = server.data_dir / "secrets" / "victim"
    secrets.mkdir(parents=True)
    (secrets / "regcred").write_text('{"auths": {"reg.example": {"auth": "dTpw"}}}')
    doc = manifest("pull")
    doc["spec"]["dataSource"] = {
        "type": "ContainerImage",
        "containerImage": {
            "image": "reg.example/disk:1",
            "imagePullSecret": {"name": "regcred", "namespace": "victim"},
        },
    }
    message = refused(server, doc, "attacker")
    assert message.startswith(
        "spec.dataSource.containerImage.imagePullSecret.namespace: Forbidden: "
    )


# -- where imports connect ------------------------------------------------------------------


@pytest.fixture
def redirecting_nginx(tmp_path: Path) -> Iterator[Nginx]:
    """/disk.img is a file; /local redirects to it under the name localhost, /meta to the
    metadata address."""
    root = tmp_path / "nginx"
    server = f"""
        root {root / "files"};
        location = /local {{ return 302 http://localhost:$server_port/disk.img; }}
        location = /meta {{ return 302 http://169.254.169.254/latest/meta-data/; }}
    """
    srv = Nginx(root, server=server).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_a_loopback_server_imports_from_loopback(server: Server, redirecting_nginx: Nginx) -> None:
    sha256, _ = write_disk_image(redirecting_nginx.files / "disk.img", MiB, seed=95)
    server.create(http_manifest("local", f"{redirecting_nginx.url}/local"))
    obj = server.wait_phase("local", ("Ready", "Failed"))
    assert obj["status"]["phase"] == "Ready", obj["status"]
    assert obj["status"]["checksum"]["sha256"] == sha256


@pytest.mark.parametrize(
    ("source", "address"),
    [
        ({"type": "HTTP", "http": {"url": "http://169.254.169.254/latest/"}}, "169.254.169.254"),
        ({"type": "HTTP", "http": {"url": "http://[::ffff:a9fe:a9fe]/x"}}, "169.254.169.254"),
        ({"type": "HTTP", "http": {"url": "http://[fe80::1]:8080/x"}}, "fe80::1"),
        ({"type": "HTTP", "http": {"url": "http://0.0.0.0:9/x"}}, "0.0.0.0"),
        ({"type": "HTTP", "http": {"url": "REDIRECT"}}, "169.254.169.254"),
        (
            {"type": "ContainerImage", "containerImage": {"image": "169.254.169.254/disk:1"}},
            "169.254.169.254",
        ),
    ],
)
def test_imports_never_reach_link_local_or_unspecified_addresses(
    server: Server, redirecting_nginx: Nginx, source: dict[str, Any], address: str
) -> None:
    if source["type"] == "HTTP" and source["http"]["url"] == "REDIRECT":
        source = {"type": "HTTP", "http": {"url": f"{redirecting_nginx.url}/meta"}}
    doc = manifest("meta")
    doc["spec"]["dataSource"] = source
    started = time.monotonic()
    server.create(doc)
    obj = server.wait_phase("meta", ("Ready", "Failed"), timeout=20)
    assert obj["status"]["phase"] == "Failed"
    assert condition(obj)["reason"] == "SourceUnreachable"
    message = condition(obj)["message"]
    assert "imports may not connect to " in message and address in message, message
    assert "--import-allow" in message
    assert time.monotonic() - started < 10, "a refused address is not tried again"


def test_a_server_beyond_loopback_refuses_loopback_until_allowed(
    tmp_path: Path, redirecting_nginx: Nginx
) -> None:
    sha256, _ = write_disk_image(redirecting_nginx.files / "disk.img", MiB, seed=96)
    for allow in ((), ("--import-allow", "127.0.0.0/8")):
        data = tmp_path / f"data{len(allow)}"
        with Server(data, *allow, host="0.0.0.0").start() as srv:
            srv.token = (data / "admin.token").read_text().strip()
            srv.create(http_manifest("local", f"{redirecting_nginx.url}/disk.img"))
            obj = srv.wait_phase("local", ("Ready", "Failed"))
            if allow:
                assert obj["status"]["phase"] == "Ready", obj["status"]
                assert obj["status"]["checksum"]["sha256"] == sha256
            else:
                assert obj["status"]["phase"] == "Failed"
                message = condition(obj)["message"]
                assert "imports may not connect to 127.0.0.1: a loopback address" in message


# -- credentials in source URLs -------------------------------------------------------------


@pytest.fixture
def basic_auth_nginx(tmp_path: Path) -> Iterator[Nginx]:
    root = tmp_path / "auth-nginx"
    (tmp_path / "htpasswd").write_text("alice:{PLAIN}s3cret-pw\n")
    server = f"""
        root {root / "files"};
        auth_basic "images";
        auth_basic_user_file {tmp_path / "htpasswd"};
    """
    srv = Nginx(root, server=server).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_credentials_in_a_source_url_work_and_are_never_shown(
    server: Server, basic_auth_nginx: Nginx
) -> None:
    sha256, _ = write_disk_image(basic_auth_nginx.files / "disk.img", MiB, seed=97)
    base = f"http://alice:{{}}@127.0.0.1:{basic_auth_nginx.port}"
    server.create(http_manifest("good", base.format("s3cret-pw") + "/disk.img"))
    server.create(http_manifest("missing", base.format("s3cret-pw") + "/missing.img"))
    server.create(http_manifest("wrong", base.format("wr0ng-pw") + "/disk.img"))
    closed = f"http://alice:cl0sed-pw@127.0.0.1:{free_port()}/disk.img"
    server.create(http_manifest("closed", closed))

    good = server.wait_phase("good", ("Ready", "Failed"))
    assert good["status"]["phase"] == "Ready", good["status"]
    assert good["status"]["checksum"]["sha256"] == sha256
    for name, answer in (("missing", "404"), ("wrong", "401"), ("closed", "cannot reach")):
        obj = server.wait_phase(name, ("Ready", "Failed"), timeout=120)
        assert obj["status"]["phase"] == "Failed"
        message = condition(obj)["message"]
        assert answer in message and "http://***@127.0.0.1:" in message, message
    statuses = json.dumps([server.get(n)["status"] for n in ("good", "missing", "wrong")])
    log = server.log_path.read_text()
    for password in ("s3cret-pw", "wr0ng-pw", "cl0sed-pw"):
        assert password not in statuses
        assert password not in log


# -- block claims: the claim directory is below DATA_DIR, its block link goes anywhere ------


def test_a_block_link_may_point_outside_the_data_directory(server: Server, tmp_path: Path) -> None:
    device = tmp_path / "outside" / "device.img"
    device.parent.mkdir()
    device.write_bytes(b"\0" * (4 * MiB))
    claim = server.claim_dir("blk")
    claim.mkdir(parents=True)
    (claim / "block").symlink_to(device)
    image = tmp_path / "disk.img"
    sha256, _ = write_disk_image(image, 4 * MiB, seed=98)

    server.create(manifest("blk"))
    upload_file(server, "blk", image)
    obj = server.wait_phase("blk", ("Ready", "Failed"))
    assert obj["status"]["phase"] == "Ready", obj["status"]
    assert sha256_file(device) == sha256
    assert not (claim / "disk.img").exists()

    # A VirtualDisk whose block link points outside is read in place, too.
    disk = server.data_dir / "pvc" / "default" / "vd-vm-disk"
    disk.mkdir()
    (disk / "block").symlink_to(device)
    server.create(ref_manifest("from-disk", "VirtualDisk", "vm-disk"))
    copy = server.wait_phase("from-disk", ("Ready", "Failed"))
    assert copy["status"]["phase"] == "Ready", copy["status"]
    assert sha256_file(server.claim_dir("from-disk") / "disk.img") == sha256


def test_a_claim_directory_linked_outside_is_refused(server: Server, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    server.claim_dir("linked").parent.mkdir(parents=True)
    server.claim_dir("linked").symlink_to(outside)
    image = tmp_path / "disk.img"
    write_disk_image(image, MiB, seed=99)
    server.create(manifest("linked"))
    url = server.upload_url("linked")
    code, _ = curl("-T", str(image), url)
    assert code >= 400
    obj = server.wait_phase("linked", ("Ready", "Failed"))
    assert obj["status"]["phase"] == "Failed"
    assert "leads outside" in condition(obj)["message"]
    assert list(outside.iterdir()) == []
