"""Registries named without a scheme: HTTPS first, plain HTTP only where allowed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from registryproc import Registry
from serverproc import free_port
from testcerts import KeyPair, make_ca, make_server_cert

from importer.oci.endpoint import (
    Endpoint,
    is_loopback,
    may_fall_back_to_http,
    registry_host,
    resolve_registry_url,
)
from importer.oci.errors import RegistryError
from importer.oci.registry import RegistryClient, connect_registry

MiB = 1 << 20


@pytest.fixture
def tls_registry(tmp_path: Path) -> Iterator[tuple[Registry, KeyPair]]:
    ca = make_ca()
    server = make_server_cert(ca)
    (tmp_path / "server.crt").write_bytes(server.cert_pem)
    (tmp_path / "server.key").write_bytes(server.key_pem)
    running = Registry(
        tmp_path / "tls-registry", tls=(tmp_path / "server.crt", tmp_path / "server.key")
    ).start()
    try:
        yield running, ca
    finally:
        running.stop()


def test_the_decision_rule() -> None:
    for loopback in ("127.0.0.1:5000", "127.3.4.5", "localhost:5000", "[::1]:5000", "LOCALHOST"):
        assert may_fall_back_to_http(loopback, insecure=False), loopback
    for remote in ("reg.example:5000", "10.0.0.7:5000", "dvcr.d8-virtualization.svc", "[fe80::1]"):
        assert not may_fall_back_to_http(remote, insecure=False), remote
        assert may_fall_back_to_http(remote, insecure=True), remote
    # An explicit scheme is used as given, insecure or not.
    for explicit in ("https://127.0.0.1:5000", "http://reg.example", "https://reg.example"):
        assert not may_fall_back_to_http(explicit, insecure=True), explicit
    assert is_loopback("::ffff:127.0.0.1") and not is_loopback("128.0.0.1")
    assert not is_loopback("localhost.example")


def test_endpoint_parsing() -> None:
    assert str(Endpoint.parse("reg.example:5000").url) == "https://reg.example:5000"
    assert str(Endpoint.parse("reg.example").http_url()) == "http://reg.example"
    assert str(Endpoint.parse("http://127.0.0.1:5000/").url) == "http://127.0.0.1:5000"
    assert Endpoint.parse("[::1]:5000").host == "::1"
    assert registry_host("https://Reg.Example:5000/") == "reg.example:5000"
    assert registry_host("[::1]:5000") == "[::1]:5000"
    for bad in ("ftp://reg.example", "", "reg.example:99999", "https://user:pw@reg.example"):
        with pytest.raises(RegistryError, match="is not a registry"):
            Endpoint.parse(bad)


async def test_plain_http_registry_on_loopback(registry: Registry) -> None:
    assert registry.url.startswith("http://")
    assert await resolve_registry_url(registry.host) == registry.url
    # The client takes the name as is and decides on its first request.
    async with RegistryClient(registry.host) as client:
        assert client.base_url == f"https://{registry.host}"  # not decided yet
        digest = await client.push_blob("vi/ns/scheme", os.urandom(MiB))
        assert client.base_url == registry.url
        assert await client.blob_exists("vi/ns/scheme", digest) == MiB
    client = await connect_registry(registry.host)
    try:
        assert client.base_url == registry.url
        assert await client.list_tags("vi/ns/scheme") == []
    finally:
        await client.close()


async def test_an_explicit_https_is_not_downgraded(registry: Registry) -> None:
    async with RegistryClient(f"https://{registry.host}") as client:
        with pytest.raises(RegistryError) as failure:
            await client.list_tags("vi/ns/x")
    assert f"TLS handshake with {registry.host} failed" in failure.value.message


async def test_https_registry_is_used_over_https(tls_registry: tuple[Registry, KeyPair]) -> None:
    registry, ca = tls_registry
    url = await resolve_registry_url(registry.host, ca_bundle=ca.cert_pem)
    assert url == f"https://{registry.host}"
    assert await resolve_registry_url(registry.host, insecure=True) == url
    async with RegistryClient(registry.host, ca_bundle=ca.cert_pem) as client:
        assert await client.list_tags("vi/ns/x") == []
        assert client.base_url == url
    # A certificate that does not verify: the registry speaks HTTPS, so no plain HTTP.
    with pytest.raises(RegistryError) as failure:
        await resolve_registry_url(registry.host)
    message = failure.value.message
    assert "certificate verify failed" in message and "plain HTTP" not in message


async def test_nothing_listening_names_both_attempts() -> None:
    host = f"127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError) as failure:
        await resolve_registry_url(host)
    message = failure.value.message
    assert message.startswith(f"reaching the registry {host}: over HTTPS: cannot connect")
    assert "; over plain HTTP: cannot connect" in message
    async with RegistryClient(host) as client:
        with pytest.raises(RegistryError) as failure:
            await client.get_manifest("vi/ns/x", "t")
    assert failure.value.message.startswith("getting the manifest of vi/ns/x:t: over HTTPS")
    with pytest.raises(RegistryError):
        await connect_registry(host)
