"""`dataSource.type: ContainerImage`: containerDisk images pulled from a real registry."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from containerdisks import OCI_TAR_GZIP, Layout, disk_layer, make_qcow2, skopeo_push, tar_layer
from containerdisks import Entry as TarEntry
from dvcrimage import check_image, skopeo_copy
from registryproc import Registry
from serverproc import Server

USER, PASSWORD = "alice", "wonderland"


def image_manifest(name: str, image: str, storage: str, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": "VirtualImage",
        "metadata": {"name": name},
        "spec": {
            "storage": storage,
            "dataSource": {"type": "ContainerImage", "containerImage": {"image": image, **extra}},
        },
    }


def docker_config(host: str, user: str = USER, password: str = PASSWORD) -> str:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": auth}}})


@pytest.fixture
def private_registry(tmp_path: Path) -> Iterator[Registry]:
    line = subprocess.run(
        ["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / "htpasswd").write_text(line + "\n")
    running = Registry(tmp_path / "registry", htpasswd=tmp_path / "htpasswd").start()
    try:
        yield running
    finally:
        running.stop()


def push_disk(tmp_path: Path, registry: Registry, repo: str, layer: bytes) -> str:
    """A containerDisk image with one gzip layer (skopeo compresses it), pushed with skopeo."""
    layout = Layout(tmp_path / f"layout-{repo.replace('/', '-')}")
    source = layout.tag("v1", layout.image([(layer, OCI_TAR_GZIP)]))
    image = f"{registry.host}/{repo}:v1"
    skopeo_push(
        source,
        image,
        f"--dest-creds={USER}:{PASSWORD}",
        cache_dir=tmp_path / "skopeo-cache",
    )
    return image


def raw_of(qcow2: bytes, tmp_path: Path) -> str:
    src = tmp_path / "x.qcow2"
    src.write_bytes(qcow2)
    out = tmp_path / "x.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, out], check=True)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_private_image_into_a_claim_and_into_dvcr(
    server: Server, private_registry: Registry, tmp_path: Path
) -> None:
    qcow2 = make_qcow2(tmp_path, seed=81)
    image = push_disk(tmp_path, private_registry, "images/cirros", disk_layer(qcow2))
    secrets = server.data_dir / "secrets" / "default"
    secrets.mkdir(parents=True)
    (secrets / "regcred").write_text(docker_config(private_registry.host))
    # The shape of a mounted Kubernetes secret works too.
    (secrets / "mounted").mkdir()
    (secrets / "mounted" / ".dockerconfigjson").write_text(docker_config(private_registry.host))

    secret = {"imagePullSecret": {"name": "regcred"}}
    server.create(image_manifest("in-pvc", image, "PersistentVolumeClaim", **secret))
    mounted = {"imagePullSecret": {"name": "mounted"}}
    server.create(image_manifest("in-dvcr", image, "ContainerRegistry", **mounted))

    in_pvc = server.wait_phase("in-pvc", ("Ready", "Failed"))
    assert in_pvc["status"]["phase"] == "Ready", in_pvc["status"]
    assert in_pvc["status"]["format"] == "qcow2"
    assert in_pvc["status"]["checksum"]["sha256"] == hashlib.sha256(qcow2).hexdigest()
    disk = (server.claim_dir("in-pvc") / "disk.img").read_bytes()
    assert hashlib.sha256(disk).hexdigest() == raw_of(qcow2, tmp_path)

    in_dvcr = server.wait_phase("in-dvcr", ("Ready", "Failed"))
    assert in_dvcr["status"]["phase"] == "Ready", in_dvcr["status"]
    out = tmp_path / "out"
    copied = skopeo_copy(in_dvcr["status"]["target"]["registryURL"], out)
    labels = check_image(out, copied, hashlib.sha256(qcow2).hexdigest())
    assert labels["source-image-format"] == "qcow2"


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        (None, "401"),
        ("missing", 'imagePullSecret "missing" does not exist'),
        ("wrong", "401"),
        ("elsewhere", "no credentials for the registry"),
    ],
)
def test_pull_failures_name_their_cause(
    server: Server, private_registry: Registry, tmp_path: Path, secret: str | None, expected: str
) -> None:
    image = push_disk(tmp_path, private_registry, "images/x", disk_layer(make_qcow2(tmp_path, 82)))
    secrets = server.data_dir / "secrets" / "default"
    secrets.mkdir(parents=True)
    (secrets / "wrong").write_text(docker_config(private_registry.host, password="nope"))
    (secrets / "elsewhere").write_text(docker_config("registry.example.com"))
    extra = {"imagePullSecret": {"name": secret}} if secret else {}
    server.create(image_manifest("x", image, "PersistentVolumeClaim", **extra))
    obj = server.wait_phase("x", ("Ready", "Failed"))
    condition = obj["status"]["conditions"][0]
    assert obj["status"]["phase"] == "Failed"
    assert condition["reason"] == "SourceUnreachable"
    assert expected in condition["message"], condition["message"]


def test_an_image_without_a_disk_is_refused(
    server: Server, private_registry: Registry, tmp_path: Path
) -> None:
    layer = tar_layer(TarEntry("etc"), TarEntry("etc/hostname", b"box\n"))
    image = push_disk(tmp_path, private_registry, "images/app", layer)
    secrets = server.data_dir / "secrets" / "default"
    secrets.mkdir(parents=True)
    (secrets / "regcred").write_text(docker_config(private_registry.host))
    server.create(
        image_manifest("app", image, "ContainerRegistry", imagePullSecret={"name": "regcred"})
    )
    obj = server.wait_phase("app", ("Ready", "Failed"))
    assert obj["status"]["phase"] == "Failed"
    assert obj["status"]["conditions"][0]["reason"] == "InvalidImage"
    assert "disk/" in obj["status"]["conditions"][0]["message"]
    index = json.loads((server.data_dir / "dvcr" / "index.json").read_text())
    assert index["manifests"] == []
