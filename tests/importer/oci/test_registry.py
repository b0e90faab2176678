"""The async registry client against a real docker-registry (distribution 2.8.2)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from registryproc import Registry
from serverproc import free_port
from testcerts import make_ca, make_server_cert, make_signing_key
from tokenserver import ISSUER, SERVICE, TokenServer, libtrust_key_id
from waiting import wait_until_async

from importer.oci import registry as registry_module
from importer.oci.auth import Credentials
from importer.oci.challenge import parse_challenges
from importer.oci.errors import describe_error_body
from importer.oci.reference import InvalidReference, Reference
from importer.oci.registry import OCI_MANIFEST, RegistryClient, RegistryError

MiB = 1 << 20
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push_streamed(client: RegistryClient, repo: str, data: bytes, seed: int = 0) -> str:
    """Hands `data` to one upload in pieces of random sizes, then finishes it."""
    rnd = random.Random(seed)
    upload = await client.start_blob_upload(repo)
    view = memoryview(data)
    position = 0
    while position < len(data):
        size = rnd.choice((1, 511, 4096, 65536, 1 * MiB, 3 * MiB + 17, rnd.randrange(1, 2 * MiB)))
        await upload.write(bytes(view[position : position + size]))
        position += size
    assert upload.offset == len(data)
    digest = sha256(data)
    await upload.finish(digest)
    return digest


async def pull(client: RegistryClient, repo: str, digest: str) -> bytes:
    return b"".join([chunk async for chunk in client.get_blob(repo, digest)])


async def push_image(client: RegistryClient, repo: str, tag: str, layer: bytes) -> str:
    """A small OCI image (one layer, a config with labels); returns the manifest digest."""
    layer_digest = await push_streamed(client, repo, layer)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {"source-image-format": "raw"}},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    config_digest = await client.push_blob(repo, config)
    assert config_digest == sha256(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": LAYER_TYPE, "digest": layer_digest, "size": len(layer)}],
        }
    ).encode()
    digest = await client.put_manifest(repo, tag, manifest, OCI_MANIFEST)
    assert digest == sha256(manifest)
    return digest


# --- a plain registry -------------------------------------------------------------------


async def test_streamed_blob_push_and_pull(registry: Registry) -> None:
    data = os.urandom(64 * MiB)
    async with RegistryClient(registry.url) as client:
        digest = await push_streamed(client, "vi/default/big", data, seed=1)
        assert await client.blob_exists("vi/default/big", digest) == len(data)
        assert sha256(await pull(client, "vi/default/big", digest)) == digest
        assert await client.blob_exists("vi/default/other", digest) is None
    assert len(registry.blob_data_files(digest)) == 1


async def test_empty_blob_and_small_blob(registry: Registry) -> None:
    async with RegistryClient(registry.url) as client:
        empty = await client.start_blob_upload("r")
        await empty.finish(sha256(b""))
        assert await client.blob_exists("r", sha256(b"")) == 0
        digest = await client.push_blob("r", b"config bytes")
        assert await pull(client, "r", digest) == b"config bytes"


async def test_manifest_push_get_and_skopeo(registry: Registry) -> None:
    repo, tag = "vi/ns/image", "uid-1"
    layer = os.urandom(3 * MiB)
    async with RegistryClient(registry.url) as client:
        manifest_digest = await push_image(client, repo, tag, layer)
        body, media_type, digest = await client.get_manifest(repo, tag)
        assert (media_type, digest) == (OCI_MANIFEST, manifest_digest)
        assert await client.get_manifest(repo, manifest_digest) == (body, media_type, digest)
        assert await client.list_tags(repo) == [tag]
        assert repo in await client.catalog()

    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is missing: apt-get install -y skopeo")
    inspected = subprocess.run(
        [skopeo, "inspect", "--tls-verify=false", f"docker://{registry.host}/{repo}:{tag}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    seen = json.loads(inspected.stdout)
    assert seen["Digest"] == manifest_digest
    assert seen["Layers"] == [sha256(layer)]
    assert seen["Labels"] == {"source-image-format": "raw"}


async def test_cross_repository_mount_keeps_one_copy(registry: Registry) -> None:
    data = os.urandom(5 * MiB)
    async with RegistryClient(registry.url) as client:
        digest = await push_streamed(client, "vi/a/src", data)
        assert await client.mount_blob("vi/b/dst", digest, from_repo="vi/a/src") is True
        assert await client.blob_exists("vi/b/dst", digest) == len(data)
        assert sha256(await pull(client, "vi/b/dst", digest)) == digest

        unknown = sha256(b"nobody pushed this")
        assert await client.mount_blob("vi/c/dst", unknown, from_repo="vi/a/src") is False
        assert await client.blob_exists("vi/c/dst", unknown) is None
    assert len(registry.blob_data_files(digest)) == 1
    assert registry.layer_link("vi/a/src", digest).exists()
    assert registry.layer_link("vi/b/dst", digest).exists()
    assert registry.upload_data("vi/c/dst") == []  # the fallback session was cancelled


async def test_delete_manifest_removes_the_tag(registry: Registry) -> None:
    async with RegistryClient(registry.url) as client:
        await push_image(client, "vi/ns/x", "keep", b"layer one")
        await push_image(client, "vi/ns/x", "drop", b"layer two")
        assert sorted(await client.list_tags("vi/ns/x")) == ["drop", "keep"]

        await client.delete_manifest("vi/ns/x", "drop")
        assert await client.list_tags("vi/ns/x") == ["keep"]
        with pytest.raises(RegistryError) as missing:
            await client.get_manifest("vi/ns/x", "drop")
        assert "404 MANIFEST_UNKNOWN" in missing.value.message

        await client.delete_manifest("vi/ns/x", "drop")  # already gone
        await client.delete_manifest("vi/ns/never", "tag")  # no such repository
        assert await client.list_tags("vi/ns/never") == []


async def test_cancel_leaves_no_tag_and_no_blob(registry: Registry) -> None:
    data = os.urandom(8 * MiB)
    async with RegistryClient(registry.url) as client:
        upload = await client.start_blob_upload("vi/ns/cancelled")
        for start in range(0, len(data), MiB):
            await upload.write(data[start : start + MiB])
        await upload.cancel()
        await upload.cancel()  # twice is fine
        with pytest.raises(RegistryError):
            await upload.write(b"more")
        assert await client.blob_exists("vi/ns/cancelled", sha256(data)) is None
        assert await client.list_tags("vi/ns/cancelled") == []
    assert registry.blob_data_files(sha256(data)) == []
    # The registry's PATCH handler may still be closing its file.
    await wait_until_async(
        lambda: registry.upload_data("vi/ns/cancelled") == [],
        timeout=5.0,
        what="the registry to drop the cancelled upload's data",
    )


async def test_wrong_digest_is_a_clear_error(registry: Registry) -> None:
    data = os.urandom(2 * MiB)
    wrong = "sha256:" + "0" * 64
    async with RegistryClient(registry.url) as client:
        upload = await client.start_blob_upload("vi/ns/bad")
        await upload.write(data)
        with pytest.raises(RegistryError) as failure:
            await upload.finish(wrong)
        assert await client.blob_exists("vi/ns/bad", sha256(data)) is None
        assert await client.blob_exists("vi/ns/bad", wrong) is None
    message = failure.value.message
    assert message.startswith(f"finishing the blob upload to vi/ns/bad as {wrong}: 400 ")
    assert "DIGEST_INVALID" in message and "Traceback" not in message
    assert failure.value.reason == "ProvisioningFailed"


async def test_registry_killed_in_the_middle_of_writes(registry: Registry) -> None:
    chunk = os.urandom(MiB)
    async with RegistryClient(registry.url) as client:
        upload = await client.start_blob_upload("vi/ns/crash")
        with pytest.raises(RegistryError) as failure:
            async with asyncio.timeout(30):
                for written in range(4096):
                    if written == 16:
                        registry.kill()
                    await upload.write(chunk)
                await upload.finish(sha256(b"whatever"))
    assert failure.value.message.startswith("pushing a blob to vi/ns/crash: ")


async def test_registry_that_stops_reading_times_out(registry: Registry) -> None:
    chunk = os.urandom(MiB)
    async with RegistryClient(registry.url, io_timeout=1.5) as client:
        upload = await client.start_blob_upload("vi/ns/stall")
        await upload.write(chunk)
        registry.pause()
        try:
            with pytest.raises(RegistryError) as failure:
                async with asyncio.timeout(30):
                    while True:
                        await upload.write(chunk)
        finally:
            registry.resume()
    assert "the registry took no data for 1.5 s" in failure.value.message


async def test_catalog_pages(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "PAGE_SIZE", 2)
    async with RegistryClient(registry.url) as client:
        for name in ("p/a", "p/b", "p/c", "p/d", "p/e"):
            await push_image(client, name, "t", name.encode())
        assert sorted(await client.catalog()) == ["p/a", "p/b", "p/c", "p/d", "p/e"]


async def test_unreachable_registry() -> None:
    async with RegistryClient(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(RegistryError) as failure:
            await client.list_tags("x")
    assert "cannot connect to 127.0.0.1:" in failure.value.message


# --- auth ------------------------------------------------------------------------------


async def test_basic_auth(htpasswd_registry: Registry) -> None:
    encoded = base64.b64encode(b"alice:wonderland").decode()
    docker_config = json.dumps({"auths": {htpasswd_registry.host: {"auth": encoded}}})
    credentials = Credentials.from_docker_config(docker_config, htpasswd_registry.host)
    async with RegistryClient(htpasswd_registry.url, credentials=credentials) as client:
        digest = await push_image(client, "vi/ns/auth", "t", os.urandom(MiB))
        assert (await client.get_manifest("vi/ns/auth", "t"))[2] == digest
        assert "vi/ns/auth" in await client.catalog()

    wrong = Credentials(username="alice", password="not-it")
    for credentials in (wrong, None):
        async with RegistryClient(htpasswd_registry.url, credentials=credentials) as client:
            with pytest.raises(RegistryError) as failure:
                await client.start_blob_upload("vi/ns/auth")
        assert "401 UNAUTHORIZED" in failure.value.message
        assert failure.value.message.startswith("starting a blob upload to vi/ns/auth: ")


@asynccontextmanager
async def token_auth(tmp_path: Path) -> AsyncIterator[tuple[Registry, TokenServer]]:
    signing = make_signing_key()
    bundle = tmp_path / "token-signer.pem"
    bundle.write_bytes(signing.cert_pem)
    server = await TokenServer(
        signing, username="bob", password="builder", refresh_token="refresh-me"
    ).start()
    registry = Registry(
        tmp_path / "registry",
        token={
            "realm": server.realm,
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(bundle),
        },
    )
    try:
        registry.start()
        yield registry, server
    finally:
        registry.stop()
        await server.stop()


async def test_bearer_token_flow(tmp_path: Path) -> None:
    async with token_auth(tmp_path) as (registry, tokens):
        credentials = Credentials(username="bob", password="builder")
        async with RegistryClient(registry.url, credentials=credentials) as client:
            data = os.urandom(6 * MiB)
            digest = await push_streamed(client, "vi/ns/tok", data)
            await push_streamed(client, "vi/ns/tok", os.urandom(MiB), seed=2)
            asked = tokens.scopes_asked
            assert asked["repository:vi/ns/tok:pull,push"] == 1, asked  # then cached
            assert await client.blob_exists("vi/ns/tok", digest) == len(data)
            assert sha256(await pull(client, "vi/ns/tok", digest)) == digest

            manifest_digest = await push_image(client, "vi/ns/tok", "v1", b"tiny layer")
            assert (await client.get_manifest("vi/ns/tok", "v1"))[2] == manifest_digest
            assert await client.mount_blob("vi/ns/copy", digest, from_repo="vi/ns/tok")
            assert (
                tokens.scopes_asked["repository:vi/ns/copy:pull,push repository:vi/ns/tok:pull"]
                == 1
            )
            assert sorted(await client.catalog()) == ["vi/ns/copy", "vi/ns/tok"]
            assert tokens.scopes_asked["registry:catalog:*"] == 1
            await client.delete_manifest("vi/ns/tok", "v1")
            assert await client.list_tags("vi/ns/tok") == []
            fetched = client.tokens_fetched
            await client.list_tags("vi/ns/tok")
            assert client.tokens_fetched == fetched

        async with RegistryClient(registry.url, credentials=credentials) as client:
            blobs = [os.urandom(MiB) for _ in range(8)]
            pushed = await asyncio.gather(
                *(push_streamed(client, "vi/ns/many", blob, seed=i) for i, blob in enumerate(blobs))
            )
            assert pushed == [sha256(blob) for blob in blobs]
            assert tokens.scopes_asked["repository:vi/ns/many:pull,push"] == 1  # shared

        by_identity_token = Credentials(identity_token="refresh-me")
        async with RegistryClient(registry.url, credentials=by_identity_token) as client:
            assert await client.blob_exists("vi/ns/tok", digest) == len(data)

        for credentials in (Credentials(username="bob", password="wrong"), None):
            async with RegistryClient(registry.url, credentials=credentials) as client:
                with pytest.raises(RegistryError) as failure:
                    await client.start_blob_upload("vi/ns/tok")
            message = failure.value.message
            assert message.startswith(
                f"starting a blob upload to vi/ns/tok: getting a token from {tokens.realm}: 401"
            )
            assert "UNAUTHORIZED: bad credentials" in message


def test_libtrust_key_id_format() -> None:
    key_id = libtrust_key_id(make_signing_key().key.public_key())  # type: ignore[arg-type]
    groups = key_id.split(":")
    assert len(groups) == 12 and all(len(group) == 4 for group in groups)


# --- TLS -------------------------------------------------------------------------------


async def test_tls_with_a_ca_bundle(tmp_path: Path) -> None:
    ca = make_ca()
    server = make_server_cert(ca)
    (tmp_path / "server.crt").write_bytes(server.cert_pem)
    (tmp_path / "server.key").write_bytes(server.key_pem)
    registry = Registry(
        tmp_path / "registry", tls=(tmp_path / "server.crt", tmp_path / "server.key")
    ).start()
    try:
        async with RegistryClient(registry.url, ca_bundle=ca.cert_pem) as client:
            digest = await push_streamed(client, "vi/ns/tls", os.urandom(2 * MiB))
            assert await client.blob_exists("vi/ns/tls", digest) == 2 * MiB

        async with RegistryClient(registry.url) as client:
            with pytest.raises(RegistryError) as failure:
                await client.blob_exists("vi/ns/tls", digest)
        assert f"TLS verification of {registry.host} failed: certificate verify failed" in (
            failure.value.message
        )

        async with RegistryClient(registry.url, insecure=True) as client:
            assert await client.blob_exists("vi/ns/tls", digest) == 2 * MiB
    finally:
        registry.stop()


def test_bad_ca_bundle_is_a_clear_error() -> None:
    with pytest.raises(RegistryError, match="the registry CA bundle cannot be used"):
        RegistryClient("https://127.0.0.1:1", ca_bundle=b"not a certificate")


# --- pure parts ------------------------------------------------------------------------


def test_docker_config_forms(tmp_path: Path) -> None:
    encoded = base64.b64encode(b"u1:pa:ss").decode()
    config = {
        "auths": {
            "reg.example:5000": {"auth": encoded},
            "https://other.example/v1/": {"username": "u2", "password": "p2"},
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
            "tokens.example": {"username": "<token>", "identitytoken": "rt"},
        }
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    for source in (path, str(path), json.dumps(config), json.dumps(config).encode()):
        found = Credentials.from_docker_config(source, "reg.example:5000")
        assert found == Credentials(username="u1", password="pa:ss")
    assert Credentials.from_docker_config(path, "http://other.example") == Credentials("u2", "p2")
    assert Credentials.from_docker_config(path, "docker.io") == Credentials("hub", "pw")
    assert Credentials.from_docker_config(path, "tokens.example").identity_token == "rt"
    assert Credentials.from_docker_config(path, "reg.example:5001") is None
    legacy = json.dumps({"reg.example:5000": {"auth": encoded}})  # .dockercfg
    assert Credentials.from_docker_config(legacy, "reg.example:5000") is not None
    assert "pa:ss" not in repr(Credentials("u1", "pa:ss"))

    for bad, complaint in (
        ("{not json", "not valid JSON"),
        (json.dumps({"auths": {"h": {"auth": "%%%"}}}), "`auth` is not base64"),
        (str(tmp_path / "missing.json"), "No such file"),
    ):
        with pytest.raises(RegistryError, match=complaint):
            Credentials.from_docker_config(bad, "h")


def test_references() -> None:
    parsed = Reference.parse("127.0.0.1:5000/vi/ns/name:uid-1")
    assert (parsed.registry, parsed.repository) == ("127.0.0.1:5000", "vi/ns/name")
    assert parsed.tag == parsed.reference == "uid-1"
    pinned = Reference.parse("reg.example/a/b@sha256:" + "a" * 64)
    assert pinned.tag is None and pinned.reference == "sha256:" + "a" * 64
    hub = Reference.parse("ubuntu")
    assert (hub.registry, hub.repository, hub.tag, hub.endpoint_host) == (
        "docker.io",
        "library/ubuntu",
        "latest",
        "registry-1.docker.io",
    )
    assert str(Reference.parse("localhost/x:1")) == "localhost/x:1"
    for bad in ("Upper/Case", "reg/a//b", "reg/x:bad tag", "reg/x@sha256:short"):
        with pytest.raises(InvalidReference):
            Reference.parse(bad)


def test_challenges_and_error_bodies() -> None:
    [bearer] = parse_challenges(
        ['Bearer realm="https://auth/token",service="reg",scope="repository:a:pull,push"']
    )
    assert (bearer.scheme, bearer.realm, bearer.service, bearer.scopes) == (
        "bearer",
        "https://auth/token",
        "reg",
        ("repository:a:pull,push",),
    )
    assert [c.scheme for c in parse_challenges(['Basic realm="r", Bearer realm="x"'])] == [
        "basic",
        "bearer",
    ]
    body = b'{"errors":[{"code":"DENIED","message":"no","detail":{}},{"code":"X","message":"y"}]}'
    assert describe_error_body(body) == ("DENIED", "DENIED: no; X: y")
    assert describe_error_body(b"<html>\n  bad gateway\n</html>") == (
        None,
        "<html> bad gateway </html>",
    )
