"""The import address policy: its classification, and its guard on real connections (real
nginx and docker-registry on 127.0.0.1, refused by a policy made for a server that listens
beyond loopback)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nginxproc import Nginx
from registryproc import Registry

from importer.errors import SourceUnreachable
from importer.netguard import (
    AddressGuard,
    AddressRefused,
    HostAddresses,
    ImportPolicy,
    host_addresses,
    parse_address,
    parse_cidr,
    parse_fib_trie,
    parse_if_inet6,
    plain,
    refusal_in,
)
from importer.oci.errors import RegistryError
from importer.oci.registry import RegistryClient
from importer.sources.container_image import open_container_image
from importer.sources.http import HttpSource

HOST = HostAddresses(
    local=frozenset({ipaddress.ip_address("192.0.2.2"), ipaddress.ip_address("fd00::2")}),
    broadcast=frozenset({ipaddress.ip_address("192.0.2.255")}),
)


def policy(local_allowed: bool, *allow: str) -> ImportPolicy:
    return ImportPolicy(local_allowed, tuple(parse_cidr(a) for a in allow), host=lambda: HOST)


def refusal(p: ImportPolicy, address: str) -> str | None:
    return p.refusal(parse_address(address))


# -- classification -------------------------------------------------------------------------

ALWAYS_REFUSED = {
    "169.254.169.254": "link-local",
    "169.254.0.1": "link-local",
    "fe80::1": "link-local",
    "fe80::1%2": "link-local",
    "::ffff:169.254.169.254": "link-local",
    "0.0.0.0": "unspecified",
    "0.1.2.3": "unspecified",
    "::": "unspecified",
    "::ffff:0.0.0.0": "unspecified",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "ff02::1": "multicast",
    "255.255.255.255": "broadcast",
}
LOCAL = {
    "127.0.0.1": "loopback",
    "127.9.8.7": "loopback",
    "::1": "loopback",
    "::ffff:127.0.0.1": "loopback",
    "::127.0.0.1": "loopback",
    "64:ff9b::7f00:1": "loopback",
    "192.0.2.2": "an address of this host",
    "::ffff:192.0.2.2": "an address of this host",
    "fd00::2": "an address of this host",
    "192.0.2.255": "broadcast address of one of this host's networks",
}
REACHABLE = ["8.8.8.8", "10.1.2.3", "192.168.0.10", "172.16.5.4", "2001:db8::1", "fd00::3"]


@pytest.mark.parametrize("local_allowed", [False, True])
@pytest.mark.parametrize(("address", "why"), ALWAYS_REFUSED.items())
def test_never_reached(address: str, why: str, local_allowed: bool) -> None:
    reason = refusal(policy(local_allowed), address)
    assert reason is not None and why in reason


@pytest.mark.parametrize(("address", "why"), LOCAL.items())
def test_loopback_and_own_addresses_only_for_a_loopback_server(address: str, why: str) -> None:
    reason = refusal(policy(False), address)
    assert reason is not None and why in reason
    assert refusal(policy(True), address) is None


@pytest.mark.parametrize("local_allowed", [False, True])
@pytest.mark.parametrize("address", REACHABLE)
def test_other_addresses_are_reached(address: str, local_allowed: bool) -> None:
    assert refusal(policy(local_allowed), address) is None


@pytest.mark.parametrize(
    ("allow", "address"),
    [
        ("169.254.169.254/32", "169.254.169.254"),
        ("169.254.169.254", "::ffff:169.254.169.254"),
        ("127.0.0.0/8", "127.0.0.2"),
        ("::ffff:127.0.0.1/128", "127.0.0.1"),
        ("192.0.2.0/24", "192.0.2.2"),
        ("fe80::/10", "fe80::1"),
    ],
)
def test_import_allow_opens_a_range(allow: str, address: str) -> None:
    assert refusal(policy(False), address) is not None
    assert refusal(policy(False, allow), address) is None


def test_import_allow_opens_only_its_range() -> None:
    p = policy(False, "127.0.0.1/32")
    assert refusal(p, "127.0.0.1") is None
    assert refusal(p, "127.0.0.2") is not None
    assert refusal(p, "169.254.169.254") is not None


@pytest.mark.parametrize("text", ["10.0.0.0/33", "example.com", "", "10.0.0.0/8/8", "::g/64"])
def test_a_bad_import_allow_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"--import-allow .* is not an address range"):
        ImportPolicy.for_server(False, ["10.0.0.0/8", text])


def test_policy_for_a_server() -> None:
    p = ImportPolicy.for_server(False, ["10.0.0.5/8", "fd00::/8"])
    assert p.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert not p.local_allowed
    assert ImportPolicy.for_server(True, []).local_allowed


@given(st.ip_addresses(v=4), st.booleans())
def test_ipv4_mapped_is_judged_as_ipv4(address: ipaddress.IPv4Address, local: bool) -> None:
    p = policy(local)
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert plain(mapped) == address
    assert p.refusal(mapped) == p.refusal(address)


@given(st.ip_addresses(), st.booleans())
def test_link_local_and_multicast_are_never_reached_unless_allowed(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, local: bool
) -> None:
    judged = plain(address)
    if judged.is_link_local or judged.is_multicast or judged.is_unspecified:
        assert policy(local).refusal(address) is not None
    single = 32 if judged.version == 4 else 128
    assert policy(local, f"{judged}/{single}").refusal(address) is None


def test_host_addresses_from_proc() -> None:
    fib_trie = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 10.1.0.0/16 2 0 2
           |-- 10.1.0.0
              /16 link UNICAST
           |-- 10.1.2.3
              /32 host LOCAL
        |-- 10.1.255.255
           /32 link BROADCAST
"""
    found = parse_fib_trie(fib_trie)
    assert found.local == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")}
    assert found.broadcast == {
        ipaddress.ip_address("127.255.255.255"),
        ipaddress.ip_address("10.1.255.255"),
    }
    if_inet6 = (
        "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"
        "00000000000000000000000000000001 01 80 10 80       lo\n"
    )
    assert parse_if_inet6(if_inet6) == {
        ipaddress.ip_address("fe80::fc:ff:fe00:1"),
        ipaddress.ip_address("::1"),
    }


def test_this_hosts_addresses_are_refused_beyond_loopback() -> None:
    """Read from this machine's /proc: every address it has is refused to a server that
    listens beyond loopback, and none to one that listens on loopback alone."""
    own = host_addresses()
    assert ipaddress.ip_address("127.0.0.1") in own.local
    beyond, local = ImportPolicy.for_server(False, []), ImportPolicy.for_server(True, [])
    for address in own.local:
        assert beyond.refusal(address) is not None
        if not address.is_link_local:
            assert local.refusal(address) is None


# -- the guard on real connections ----------------------------------------------------------

BEYOND_LOOPBACK = AddressGuard(ImportPolicy.for_server(False, []))
LOOPBACK_SERVER = AddressGuard(ImportPolicy.for_server(True, []))


@pytest.fixture
def redirecting_nginx(tmp_path: Path) -> Iterator[Nginx]:
    """/meta redirects to the metadata address, /mapped to 127.0.0.2 written as IPv6,
    /any to 0.0.0.0 (which reaches this host), /self to itself under the name localhost;
    /file.img is a file."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "file.img").write_bytes(b"x" * 1000)
    server = f"""
        root {files};
        location = /meta {{ return 302 http://169.254.169.254/latest/meta-data/; }}
        location = /mapped {{ return 302 http://[::ffff:127.0.0.2]:$server_port/file.img; }}
        location = /any {{ return 302 http://0.0.0.0:$server_port/file.img; }}
        location = /self {{ return 302 http://localhost:$server_port/file.img; }}
    """
    srv = Nginx(tmp_path / "nginx", server=server).start()
    try:
        yield srv
    finally:
        srv.stop()


async def _get(guard: AddressGuard, url: str) -> int:
    async with (
        aiohttp.ClientSession(connector=guard.connector()) as session,
        session.get(url) as response,
    ):
        await response.read()
        return response.status


async def test_a_loopback_server_reaches_loopback(redirecting_nginx: Nginx) -> None:
    assert await _get(LOOPBACK_SERVER, f"{redirecting_nginx.url}/file.img") == 200
    assert await _get(LOOPBACK_SERVER, f"{redirecting_nginx.url}/self") == 200


async def test_a_literal_loopback_address_is_refused(redirecting_nginx: Nginx) -> None:
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await _get(BEYOND_LOOPBACK, f"{redirecting_nginx.url}/file.img")
    refused = refusal_in(caught.value)
    assert isinstance(refused, AddressRefused)
    assert "127.0.0.1: a loopback address" in str(refused)
    assert "--import-allow 127.0.0.1/32" in str(refused)


async def test_a_name_that_resolves_to_loopback_is_refused(redirecting_nginx: Nginx) -> None:
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await _get(BEYOND_LOOPBACK, f"http://localhost:{redirecting_nginx.port}/file.img")
    refused = refusal_in(caught.value)
    assert refused is not None and "localhost resolves to" in str(refused)


@pytest.mark.parametrize(
    ("path", "address"),
    [("meta", "169.254.169.254"), ("mapped", "(127.0.0.2)"), ("any", "0.0.0.0")],
)
async def test_a_redirect_from_an_allowed_host_is_checked_again(
    redirecting_nginx: Nginx, path: str, address: str
) -> None:
    guard = AddressGuard(ImportPolicy.for_server(False, ["127.0.0.1/32"]))
    assert await _get(guard, f"{redirecting_nginx.url}/file.img") == 200
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await _get(guard, f"{redirecting_nginx.url}/{path}")
    refused = refusal_in(caught.value)
    assert refused is not None and address in str(refused)


async def test_the_metadata_address_is_refused_even_for_a_loopback_server() -> None:
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await _get(LOOPBACK_SERVER, "http://169.254.169.254/latest/meta-data/")
    refused = refusal_in(caught.value)
    assert refused is not None and "link-local" in str(refused)


async def test_http_source_fails_at_once_on_a_refused_address(redirecting_nginx: Nginx) -> None:
    started = time.monotonic()
    url = f"http://user:secret@127.0.0.1:{redirecting_nginx.port}/file.img"
    with pytest.raises(SourceUnreachable) as caught:
        async with HttpSource(url, guard=BEYOND_LOOPBACK, retries=5, backoff=5):
            pass
    assert time.monotonic() - started < 4, "a refused address is not tried again"
    message = caught.value.message
    assert "127.0.0.1" in message and "--import-allow" in message
    assert "secret" not in message and "***@" in message


async def test_http_source_follows_a_redirect_only_where_allowed(
    redirecting_nginx: Nginx,
) -> None:
    guard = AddressGuard(ImportPolicy.for_server(False, ["127.0.0.1/32"]))
    with pytest.raises(SourceUnreachable, match=r"169\.254\.169\.254: a link-local"):
        async with HttpSource(f"{redirecting_nginx.url}/meta", guard=guard, backoff=5):
            pass
    async with HttpSource(f"{redirecting_nginx.url}/file.img", guard=guard) as source:
        assert source.length == 1000


async def test_registry_client_is_guarded(registry: Registry) -> None:
    async with RegistryClient(registry.url, guard=LOOPBACK_SERVER) as client:
        assert await client.list_tags("nothing/here") == []
    async with RegistryClient(registry.url, guard=BEYOND_LOOPBACK) as client:
        with pytest.raises(RegistryError, match=r"127\.0\.0\.1: a loopback address"):
            await client.list_tags("nothing/here")


async def test_container_image_without_scheme_does_not_fall_back(registry: Registry) -> None:
    """A refused HTTPS probe does not go on to try plain HTTP at the same address."""
    with pytest.raises(SourceUnreachable) as caught:
        async with open_container_image(f"{registry.host}/disk:1", guard=BEYOND_LOOPBACK):
            pass
    message = caught.value.message
    assert "imports may not connect to 127.0.0.1" in message
    assert "plain HTTP" not in message
