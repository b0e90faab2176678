"""validate_manifest: every field of the wrong type is Invalid naming the field, sources stay
in the image's namespace, and names are limited so that every name made of them is valid."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from importer.oci.reference import REPOSITORY
from uploader.errors import Invalid
from uploader.quoting import MAX_QUOTED
from uploader.resources import (
    CLUSTER_VIRTUAL_IMAGE,
    MAX_NAME_LENGTH,
    VIRTUAL_IMAGE,
    Kind,
    validate_manifest,
    validate_name,
    validate_namespace,
)
from uploader.server.destinations import claim_name, dvcr_repo
from uploader.server.paths import NAME_MAX

PEM = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="  # "-----BEGIN CERTIFICATE-----\n"


def doc(source: dict[str, Any], kind: Kind = VIRTUAL_IMAGE, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": kind.name,
        "metadata": {"name": "img"},
        "spec": {"dataSource": source, **spec},
    }


def ref(kind: str, name: str = "src", **extra: Any) -> dict[str, Any]:
    return {"type": "ObjectRef", "objectRef": {"kind": kind, "name": name, **extra}}


def pull(**secret: Any) -> dict[str, Any]:
    image = {"image": "reg.example/disk:1", "imagePullSecret": secret}
    return {"type": "ContainerImage", "containerImage": image}


def invalid(manifest: Any, kind: Kind = VIRTUAL_IMAGE, namespace: str | None = "team") -> str:
    with pytest.raises(Invalid) as caught:
        validate_manifest(manifest, kind, namespace if kind.namespaced else None)
    return caught.value.message


def valid(manifest: Any, kind: Kind = VIRTUAL_IMAGE, namespace: str | None = "team") -> None:
    validate_manifest(manifest, kind, namespace if kind.namespaced else None)


def _set(manifest: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(manifest)
    *parents, last = path.split(".")
    target = changed
    for part in parents:
        target = target[part]
    target[last] = value
    return changed


HTTP = doc({"type": "HTTP", "http": {"url": "https://example.com/disk.img"}})
UPLOAD = doc({"type": "Upload"})


# -- types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manifest", "path", "value"),
    [
        (UPLOAD, "metadata", ["name", "x"]),
        (UPLOAD, "metadata.name", 5),
        (UPLOAD, "metadata.name", ["x"]),
        (UPLOAD, "metadata.labels", ["a"]),
        (UPLOAD, "metadata.labels", {"app": 5}),
        (UPLOAD, "metadata.labels", {"app": None}),
        (UPLOAD, "metadata.annotations", {"note": {"deep": "x"}}),
        (UPLOAD, "spec", "PersistentVolumeClaim"),
        (UPLOAD, "spec.storage", ["ContainerRegistry"]),
        (UPLOAD, "spec.storage", 1),
        (UPLOAD, "spec.persistentVolumeClaim", {"storageClassName": 5}),
        (UPLOAD, "spec.dataSource", []),
        (UPLOAD, "spec.dataSource.type", {"HTTP": 1}),
        (UPLOAD, "spec.dataSource.upload", []),
        (UPLOAD, "spec.dataSource.upload", {"checksum": ["a"]}),
        (UPLOAD, "spec.dataSource.upload", {"checksum": {"sha256": 5}}),
        (HTTP, "spec.dataSource.http", "https://example.com/x"),
        (HTTP, "spec.dataSource.http.url", 5),
        (HTTP, "spec.dataSource.http.url", ["https://example.com/x"]),
        (HTTP, "spec.dataSource.http.url", "https://[::1/x"),
        (HTTP, "spec.dataSource.http.url", "https://example.com:99999/x"),
        (HTTP, "spec.dataSource.http.checksum", ["md5"]),
        (HTTP, "spec.dataSource.http.checksum", {"md5": 5}),
        (HTTP, "spec.dataSource.http.caBundle", 5),
        (doc(pull(name="s")), "spec.dataSource.containerImage.image", 5),
        (doc(pull(name="s")), "spec.dataSource.containerImage.imagePullSecret", "s"),
        (doc(pull(name="s")), "spec.dataSource.containerImage.imagePullSecret.name", 5),
        (doc(pull(name="s")), "spec.dataSource.containerImage.imagePullSecret.namespace", 5),
        (doc(ref("VirtualImage")), "spec.dataSource.objectRef", "src"),
        (doc(ref("VirtualImage")), "spec.dataSource.objectRef.kind", ["VirtualImage"]),
        (doc(ref("VirtualImage")), "spec.dataSource.objectRef.name", 5),
        (doc(ref("VirtualImage")), "spec.dataSource.objectRef.namespace", 5),
        (doc(ref("VirtualDisk")), "spec.dataSource.objectRef.namespace", ["team"]),
    ],
)
def test_a_field_of_the_wrong_type_is_invalid_naming_it(
    manifest: dict[str, Any], path: str, value: Any
) -> None:
    valid(manifest)
    message = invalid(_set(manifest, path, value))
    assert message.startswith(path), message


def test_a_missing_name_is_required() -> None:
    manifest = copy.deepcopy(UPLOAD)
    del manifest["metadata"]["name"]
    assert invalid(manifest).startswith("metadata.name: Required value")


@pytest.mark.parametrize("body", [None, [], "text", 5])
def test_a_body_that_is_no_object_is_invalid(body: Any) -> None:
    assert invalid(body).startswith("body")


# -- namespaces -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["VirtualImage", "VirtualDisk"])
def test_an_object_ref_to_another_namespace_is_forbidden(kind: str) -> None:
    message = invalid(doc(ref(kind, namespace="victim")), namespace="attacker")
    assert message.startswith("spec.dataSource.objectRef.namespace: Forbidden: ")
    assert '"attacker"' in message and '"victim"' in message


@pytest.mark.parametrize("namespace", ["/tmp/outside", "..", "a/b", "UPPER", "x" * 64, ""])
def test_an_object_ref_namespace_that_is_no_namespace_is_invalid(namespace: str) -> None:
    for kind in (VIRTUAL_IMAGE, CLUSTER_VIRTUAL_IMAGE):
        message = invalid(doc(ref("VirtualDisk", namespace=namespace), kind), kind)
        assert message.startswith("spec.dataSource.objectRef.namespace: "), message


def test_an_object_ref_may_name_its_own_namespace() -> None:
    valid(doc(ref("VirtualImage", namespace="team")), namespace="team")
    valid(doc(ref("VirtualDisk", namespace="team")), namespace="team")
    valid(doc(ref("VirtualImage")), namespace="team")


def test_a_cluster_image_names_the_namespace_of_a_namespaced_source() -> None:
    cluster = CLUSTER_VIRTUAL_IMAGE
    message = invalid(doc(ref("VirtualImage"), cluster), cluster)
    assert message.startswith("spec.dataSource.objectRef.namespace: Required value")
    valid(doc(ref("VirtualImage", namespace="victim"), cluster), cluster)
    valid(doc(ref("ClusterVirtualImage"), cluster), cluster)


def test_a_cluster_image_ref_has_no_namespace() -> None:
    message = invalid(doc(ref("ClusterVirtualImage", namespace="team")))
    assert message.startswith("spec.dataSource.objectRef.namespace: Forbidden")


def test_an_image_pull_secret_of_another_namespace_is_forbidden() -> None:
    message = invalid(doc(pull(name="regcred", namespace="victim")), namespace="attacker")
    field = "spec.dataSource.containerImage.imagePullSecret.namespace"
    assert message.startswith(f"{field}: Forbidden: ")
    valid(doc(pull(name="regcred", namespace="attacker")), namespace="attacker")
    valid(doc(pull(name="regcred")), namespace="attacker")
    cluster = CLUSTER_VIRTUAL_IMAGE
    valid(doc(pull(name="regcred", namespace="victim"), cluster), cluster)
    message = invalid(doc(pull(name="regcred", namespace="../x"), cluster), cluster)
    assert message.startswith(f"{field}: Invalid value")


def test_the_request_namespace_is_validated() -> None:
    for namespace in ("..", "a/b", "", "x" * 64):
        assert invalid(UPLOAD, namespace=namespace).startswith("metadata.namespace: ")


# -- names and what is made of them ---------------------------------------------------------


def test_names_are_limited_to_128_characters() -> None:
    valid(_set(UPLOAD, "metadata.name", "a" * MAX_NAME_LENGTH))
    message = invalid(_set(UPLOAD, "metadata.name", "a" * 253))
    assert message.startswith("metadata.name: Invalid value: ")
    assert "no more than 128 characters" in message
    message = invalid(doc(ref("VirtualDisk", "d" * 129)))
    assert message.startswith("spec.dataSource.objectRef.name: Invalid value")


def test_a_secret_name_may_have_kubernetes_253_characters() -> None:
    valid(doc(pull(name="s" * 253)))
    assert "no more than 253" in invalid(doc(pull(name="s" * 254)))


def test_a_long_value_is_quoted_cut() -> None:
    name = "N" * 100_000
    message = invalid(_set(UPLOAD, "metadata.name", name))
    assert len(message) < MAX_QUOTED + 200
    assert f'"{"N" * MAX_QUOTED}…"' in message
    message = invalid(_set(HTTP, "spec.dataSource.http.url", "ftp://" + "u" * 50_000))
    assert len(message) < MAX_QUOTED + 200 and "…" in message
    message = invalid(_set(UPLOAD, "spec." + "k" * 10_000, 1))
    assert message.startswith("spec.kkk") and len(message) < 2 * MAX_QUOTED + 200


def test_credentials_in_an_invalid_url_are_not_echoed() -> None:
    message = invalid(_set(HTTP, "spec.dataSource.http.url", "ftp://user:hunter2@host/x"))
    assert "hunter2" not in message and "***@host" in message


_LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
_NAME = st.lists(_LABEL, min_size=1, max_size=8).map(".".join)


@given(_NAME, _LABEL)
def test_every_valid_name_makes_valid_derived_names(name: str, namespace: str) -> None:
    """Claim directories fit a file name, DVCR repositories are valid OCI repository names
    leaving room for the registry host, for names with dots and `--` too."""
    if len(name) > MAX_NAME_LENGTH or len(namespace) > 63:
        return
    validate_name(name)
    validate_namespace(namespace)
    image = {"kind": "VirtualImage", "metadata": {"name": name, "namespace": namespace}}
    cluster = {"kind": "ClusterVirtualImage", "metadata": {"name": name}}
    assert len(claim_name(image).encode()) <= NAME_MAX
    assert len(f"vd-{name}".encode()) <= NAME_MAX
    for repo in (dvcr_repo(image), dvcr_repo(cluster)):
        assert REPOSITORY.fullmatch(repo), repo
        assert len(repo) <= 195


def test_the_longest_names_make_valid_derived_names() -> None:
    name = ("a--b." * 26)[:127] + "z"
    namespace = "n" * 63
    validate_name(name)
    validate_namespace(namespace)
    image = {"kind": "VirtualImage", "metadata": {"name": name, "namespace": namespace}}
    assert REPOSITORY.fullmatch(dvcr_repo(image))
    assert len(f"dvcr.d8-virtualization.svc/{dvcr_repo(image)}") <= 255
