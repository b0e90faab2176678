"""The control API: create, get, list, watch, replace, delete, validation."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from diskimages import MiB
from serverproc import API, Server, background_upload, manifest


def put_file(url: str, path: Path) -> int:
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(path), url],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def test_create_get_list(server: Server) -> None:
    created = server.create(manifest("alpha"))
    meta = created["metadata"]
    assert meta["name"] == "alpha"
    assert meta["namespace"] == "default"
    assert len(meta["uid"]) == 36
    assert meta["generation"] == 1
    assert created["spec"]["storage"] == "PersistentVolumeClaim"
    status = created["status"]
    assert status["phase"] == "WaitForUserUpload"
    urls = status["imageUploadURLs"]
    assert urls["external"].startswith(server.url + "/upload/")
    assert urls["external"] == urls["inCluster"]
    token = urls["external"].rsplit("/", 1)[1]
    assert len(token) >= 40  # 256 bits, url-safe base64

    code, listed = server.call("GET", server.images_path())
    assert code == 200
    assert listed["kind"] == "VirtualImageList"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["alpha"]
    code, other = server.call("GET", server.images_path("other"))
    assert other["items"] == []


def test_get_missing_is_404_status(server: Server) -> None:
    code, body = server.call("GET", server.images_path(name="nope"))
    assert code == 404
    assert body["kind"] == "Status"
    assert body["status"] == "Failure"
    assert body["reason"] == "NotFound"
    assert body["code"] == 404
    assert '"nope"' in body["message"]


def test_duplicate_create_is_409(server: Server) -> None:
    server.create(manifest("twice"))
    code, body = server.call("POST", server.images_path(), manifest("twice"))
    assert code == 409
    assert body["reason"] == "AlreadyExists"


def test_storage_defaults_to_container_registry(server: Server) -> None:
    doc = manifest("dflt")
    del doc["spec"]["storage"]
    obj = server.create(doc)
    assert obj["spec"]["storage"] == "ContainerRegistry"


def _with(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    *parents, last = path.split(".")
    target = doc
    for part in parents:
        target = target.setdefault(part, {})
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("spec.storage", "Floppy", "spec.storage"),
        ("spec.dataSource", _DELETE, "spec.dataSource"),
        ("spec", _DELETE, "spec"),
        ("metadata.name", "Bad_Name", "metadata.name"),
        ("metadata.name", "-leading", "metadata.name"),
        ("metadata.name", "", "metadata.name"),
        ("apiVersion", "v1", "apiVersion"),
        ("kind", "VirtualDisk", "kind"),
        ("spec.dataSource.type", "FTP", "spec.dataSource.type"),
        ("spec.dataSource.type", "HTTP", "spec.dataSource.http"),
        ("spec.dataSource.upload", {"checksum": {"sha256": "xyz"}}, "checksum.sha256"),
        ("spec.dataSource.upload", {"checksum": {"sha1": "ab"}}, "checksum.sha1"),
        ("spec.dataSource.http", {"url": "ftp://x"}, "spec.dataSource.http"),
        ("spec.extra", 1, "spec.extra"),
        ("metadata.namespace", "elsewhere", "metadata.namespace"),
    ],
)
def test_bad_manifests_are_422_naming_the_field(
    server: Server, path: str, value: Any, field: str
) -> None:
    code, body = server.call("POST", server.images_path(), _with(manifest("x"), path, value))
    assert code == 422, body
    assert body["reason"] == "Invalid"
    assert field in body["message"]
    assert server.call("GET", server.images_path())[1]["items"] == []


def test_http_source_needs_valid_url_and_ca_bundle(server: Server) -> None:
    doc = _with(
        manifest("h"),
        "spec.dataSource",
        {"type": "HTTP", "http": {"url": "https://x/y", "caBundle": "%%%"}},
    )
    code, body = server.call("POST", server.images_path(), doc)
    assert code == 422
    assert "caBundle" in body["message"]


def test_yaml_body_is_accepted(server: Server) -> None:
    body = (
        b"apiVersion: virtualization.deckhouse.io/v1alpha2\n"
        b"kind: VirtualImage\n"
        b"metadata: {name: from-yaml}\n"
        b"spec: {storage: PersistentVolumeClaim, dataSource: {type: Upload}}\n"
    )
    request = urllib.request.Request(
        server.url + server.images_path(),
        data=body,
        method="POST",
        headers={"Content-Type": "application/yaml"},
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 201
    assert server.get("from-yaml")["status"]["phase"] == "WaitForUserUpload"


def test_replace_before_ready_starts_over(server: Server, tmp_path: Path) -> None:
    server.create(manifest("edit"))
    old_url = server.upload_url("edit")
    doc = manifest("edit", checksum={"sha256": "a" * 64})
    code, obj = server.call("PUT", server.images_path(name="edit"), doc)
    assert code == 200, obj
    assert obj["metadata"]["generation"] == 2
    assert obj["status"]["observedGeneration"] == 2
    assert obj["spec"]["dataSource"]["upload"]["checksum"]["sha256"] == "a" * 64
    new_url = obj["status"]["imageUploadURLs"]["external"]
    assert new_url != old_url
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(MiB))
    assert put_file(old_url, image) == 404
    assert put_file(new_url, image) == 422  # the new spec's checksum is enforced


def test_replace_after_ready_is_spec_immutable(server: Server, tmp_path: Path) -> None:
    server.create(manifest("frozen"))
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(MiB))
    assert put_file(server.upload_url("frozen"), image) == 200
    code, body = server.call(
        "PUT", server.images_path(name="frozen"), manifest("frozen", checksum={"md5": "b" * 32})
    )
    assert code == 422
    assert body["reason"] == "SpecImmutable"
    # The same spec again is not a change.
    code, body = server.call("PUT", server.images_path(name="frozen"), manifest("frozen"))
    assert code == 200
    assert body["status"]["phase"] == "Ready"


def test_delete_removes_image_data_and_token(server: Server, tmp_path: Path) -> None:
    server.create(manifest("gone"))
    url = server.upload_url("gone")
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(MiB))
    assert put_file(url, image) == 200
    assert server.claim_dir("gone").exists()
    code, obj = server.call("DELETE", server.images_path(name="gone"))
    assert code == 200
    assert obj["status"]["phase"] == "Terminating"
    assert server.call("GET", server.images_path(name="gone"))[0] == 404
    assert not server.claim_dir("gone").exists()
    assert put_file(url, image) == 404
    code, _ = server.call("DELETE", server.images_path(name="gone"))
    assert code == 404


def test_delete_during_upload_cancels_it(server: Server, tmp_path: Path) -> None:
    server.create(manifest("midway"))
    url = server.upload_url("midway")
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(32 * MiB))
    proc = background_upload(image, url, "4M")
    server.wait_phase("midway", ("Provisioning",))
    assert server.call("DELETE", server.images_path(name="midway"))[0] == 200
    out, _ = proc.communicate(timeout=60)
    assert out != b"200"
    assert not server.claim_dir("midway").exists()


def test_watch_streams_added_modified_deleted(server: Server, tmp_path: Path) -> None:
    server.create(manifest("seen"))
    events: list[dict[str, Any]] = []
    opened = threading.Event()

    def watch() -> None:
        url = server.url + server.images_path() + "?watch=true"
        with urllib.request.urlopen(url, timeout=60) as response:
            opened.set()
            for line in response:
                events.append(json.loads(line))
                if events[-1]["type"] == "DELETED":
                    return

    thread = threading.Thread(target=watch)
    thread.start()
    opened.wait(10)
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(4 * MiB))
    assert put_file(server.upload_url("seen"), image) == 200
    server.call("DELETE", server.images_path(name="seen"))
    thread.join(30)
    types = [e["type"] for e in events]
    assert types[0] == "ADDED"
    assert "MODIFIED" in types
    assert types[-1] == "DELETED"
    phases = [e["object"]["status"]["phase"] for e in events]
    assert "Provisioning" in phases
    assert "Ready" in phases
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions)


def test_watch_one_by_name(server: Server) -> None:
    server.create(manifest("one"))
    server.create(manifest("two"))
    url = server.url + server.images_path() + "?watch=true&fieldSelector=metadata.name%3Dtwo"
    with urllib.request.urlopen(url, timeout=10) as response:
        first = json.loads(response.readline())
    assert first["type"] == "ADDED"
    assert first["object"]["metadata"]["name"] == "two"


def test_cluster_virtual_images(server: Server) -> None:
    path = f"{API}/clustervirtualimages"
    doc = manifest("shared", storage="PersistentVolumeClaim")
    doc["kind"] = "ClusterVirtualImage"
    code, body = server.call("POST", path, doc)
    assert code == 422
    assert "ContainerRegistry" in body["message"]
    doc["spec"]["storage"] = "ContainerRegistry"
    code, obj = server.call("POST", path, doc)
    assert code == 201
    assert "namespace" not in obj["metadata"]
    code, listed = server.call("GET", path)
    assert listed["kind"] == "ClusterVirtualImageList"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["shared"]
    assert server.call("GET", f"{path}/shared")[0] == 200
    assert server.call("DELETE", f"{path}/shared")[0] == 200
    assert server.call("GET", f"{path}/shared")[0] == 404


# -- label selectors, every namespace, events -------------------------------------------------


def _labelled(name: str, **labels: str) -> dict[str, Any]:
    doc = manifest(name)
    doc["metadata"]["labels"] = labels
    return doc


def _names(server: Server, path: str) -> list[str]:
    code, listed = server.call("GET", path)
    assert code == 200, listed
    return [item["metadata"]["name"] for item in listed["items"]]


def test_label_selectors_on_lists(server: Server) -> None:
    server.create(_labelled("web", tier="front", os="ubuntu"))
    server.create(_labelled("db", tier="back", os="ubuntu"))
    server.create(manifest("bare"))
    base = server.images_path() + "?labelSelector="
    quoted = urllib.parse.quote
    assert _names(server, base + quoted("tier=front")) == ["web"]
    assert _names(server, base + quoted("os==ubuntu,tier!=front")) == ["db"]
    assert _names(server, base + quoted("!tier")) == ["bare"]
    assert _names(server, base + quoted("tier in (back, front)")) == ["db", "web"]
    assert _names(server, base + quoted("tier notin (back)")) == ["bare", "web"]
    assert _names(server, base) == ["bare", "db", "web"]


@pytest.mark.parametrize(
    ("selector", "why"),
    [
        ("tier=a b", 'cannot parse the requirement "tier=a b"'),
        ("tier in (a", "a '(' without its ')'"),
        ("-tier=a", 'the key "-tier": name part must consist of alphanumeric characters'),
        ("tier=" + "v" * 64, "must be no more than 63 characters"),
        ("a/b/c=d", 'the key "a/b/c": prefix part a lowercase RFC 1123 subdomain'),
    ],
)
def test_a_malformed_label_selector_is_400(server: Server, selector: str, why: str) -> None:
    for watch in ("", "&watch=true"):
        path = server.images_path() + "?labelSelector=" + urllib.parse.quote(selector) + watch
        code, body = server.call("GET", path)
        assert (code, body["reason"]) == (400, "BadRequest")
        assert body["message"].startswith(f'unable to parse the label selector "{selector}": ')
        assert why in body["message"]


def test_label_selector_on_a_watch_drops_what_stops_matching(server: Server) -> None:
    server.create(_labelled("in", team="a"))
    server.create(_labelled("out", team="b"))
    path = server.images_path() + "?watch=true&labelSelector=team%3Da"
    with urllib.request.urlopen(server.url + path, timeout=10) as response:
        first = json.loads(response.readline())
        assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "in")
        relabelled = _labelled("in", team="c")
        code, _ = server.call("PUT", server.images_path(name="in"), relabelled)
        assert code == 200
        second = json.loads(response.readline())
    assert (second["type"], second["object"]["metadata"]["name"]) == ("DELETED", "in")


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"-x": "v"}, 'metadata.labels: Invalid value: "-x": name part must consist of'),
        ({"k": "v" * 64}, 'metadata.labels: Invalid value: "' + "v" * 64 + '": must be no more'),
        ({"k": "a b"}, 'metadata.labels: Invalid value: "a b": a valid label must be an empty'),
        ({"Bad_Prefix/k": "v"}, 'metadata.labels: Invalid value: "Bad_Prefix/k": prefix part'),
        ({"x" * 64: "v"}, "name part must be no more than 63 characters"),
    ],
)
def test_labels_are_422_naming_the_field(
    server: Server, labels: dict[str, str], message: str
) -> None:
    code, body = server.call("POST", server.images_path(), _labelled("lab", **labels))
    assert (code, body["reason"]) == (422, "Invalid")
    assert message in body["message"]


def test_images_of_every_namespace(server: Server) -> None:
    server.create(manifest("a"), namespace="one")
    server.create(_labelled("b", os="x"), namespace="two")
    path = f"{API}/virtualimages"
    code, listed = server.call("GET", path)
    assert (code, listed["kind"]) == (200, "VirtualImageList")
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in listed["items"]] == [
        ("one", "a"),
        ("two", "b"),
    ]
    assert _names(server, path + "?labelSelector=os") == ["b"]
    with urllib.request.urlopen(server.url + path + "?watch=true", timeout=10) as response:
        seen = {json.loads(response.readline())["object"]["metadata"]["name"] for _ in range(2)}
    assert seen == {"a", "b"}


def test_a_list_of_every_namespace_needs_a_token_for_every_namespace(tmp_path: Path) -> None:
    import yaml

    tokens = tmp_path / "tokens.yaml"
    narrow, wide = "narrow-token-0123456789", "wide-token-0123456789ab"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {"user": "nat", "token": narrow, "role": "admin", "namespaces": ["one"]},
                    {"user": "vic", "token": wide, "role": "view", "namespaces": "*"},
                ]
            }
        )
    )
    with Server(tmp_path / "data", "--api-token-file", str(tokens)).start() as srv:
        srv.token = narrow
        srv.create(manifest("a"), namespace="one")
        code, body = srv.call("GET", f"{API}/virtualimages")
        assert (code, body["reason"]) == (403, "Forbidden")
        assert body["message"] == (
            'user "nat" may not list virtualimages.virtualization.deckhouse.io across all '
            'namespaces: that needs a token with namespaces: "*"'
        )
        srv.token = wide
        assert _names(srv, f"{API}/virtualimages") == ["a"]


def test_events_of_an_image(server: Server, tmp_path: Path) -> None:
    server.create(manifest("ev"))
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(2 * MiB))
    assert put_file(server.upload_url("ev"), image) == 200
    code, events = server.call("GET", server.images_path(name="ev") + "/events")
    assert code == 200
    assert (events["apiVersion"], events["kind"]) == ("v1", "EventList")
    reasons = [(e["type"], e["reason"]) for e in events["items"]]
    assert reasons[0] == ("Normal", "WaitForUserUpload")
    assert reasons[-1] == ("Normal", "Ready")
    first = events["items"][0]
    assert first["involvedObject"]["kind"] == "VirtualImage"
    assert first["involvedObject"]["uid"] == server.get("ev")["metadata"]["uid"]
    assert first["count"] == 1 and first["source"] == {"component": "dvcr-uploader"}
    assert first["firstTimestamp"] <= first["lastTimestamp"]
    code, body = server.call("GET", server.images_path(name="nope") + "/events")
    assert (code, body["reason"]) == (404, "NotFound")
