"""Which addresses an import may connect to, checked on every connection it makes.

Never: link-local addresses (169.254.0.0/16, fe80::/10: cloud metadata services answer
there), the unspecified address (0.0.0.0/8, ::: a connection to it reaches this host),
multicast, and broadcast (255.255.255.255 and the broadcast addresses of this host's
networks). Loopback (127.0.0.0/8, ::1) and this host's own addresses only while the
server listens on loopback alone: once others reach the server, an import must not be
a way to reach what only this host may. `--import-allow CIDR` opens a range, whatever it
holds. An IPv4 address carried in IPv6 (::ffff:a.b.c.d, ::a.b.c.d, 64:ff9b::a.b.c.d) is
judged as that IPv4 address.

`AddressGuard.connector()` is an aiohttp connector that applies the policy to the
addresses a name resolves to (refused ones are dropped; when none is left the connection
fails) and again to the address of each socket it opens, so a literal address, a
redirect, and a name that resolves differently the second time (DNS rebinding) are all
checked where the connection is made. A refusal is an `AddressRefused` (an OSError),
which `refusal_in()` finds in what aiohttp raises.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_FIB_TRIE = Path("/proc/net/fib_trie")
_IF_INET6 = Path("/proc/net/if_inet6")


@dataclass(frozen=True)
class HostAddresses:
    """This host's own addresses, and the broadcast addresses of its IPv4 networks."""

    local: frozenset[IPAddress] = frozenset()
    broadcast: frozenset[IPAddress] = frozenset()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def parse_fib_trie(text: str) -> HostAddresses:
    """The `/32 host LOCAL` and `/32 link BROADCAST` entries of /proc/net/fib_trie."""
    local: set[IPAddress] = set()
    broadcast: set[IPAddress] = set()
    address: str | None = None
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "|--":
            address = words[1]
        elif address is not None and words[:1] == ["/32"]:
            if words[-1] == "LOCAL":
                local.add(ipaddress.IPv4Address(address))
            elif words[-1] == "BROADCAST":
                broadcast.add(ipaddress.IPv4Address(address))
    return HostAddresses(frozenset(local), frozenset(broadcast))


def parse_if_inet6(text: str) -> frozenset[IPAddress]:
    """The addresses of /proc/net/if_inet6 (32 hex digits first on each line)."""
    found: set[IPAddress] = set()
    for line in text.splitlines():
        words = line.split()
        if words and len(words[0]) == 32:
            found.add(ipaddress.IPv6Address(int(words[0], 16)))
    return frozenset(found)


def host_addresses() -> HostAddresses:
    """Read anew on every call: interfaces come and go (Linux; elsewhere none are known)."""
    ipv4 = parse_fib_trie(_read(_FIB_TRIE))
    return HostAddresses(ipv4.local | parse_if_inet6(_read(_IF_INET6)), ipv4.broadcast)


def plain(address: IPAddress) -> IPAddress:
    """An IPv4 address carried in IPv6 as that IPv4 address; others unchanged."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def parse_address(text: str) -> IPAddress:
    """An address as sockets and resolvers give it (an IPv6 one may carry `%scope`)."""
    return ipaddress.ip_address(text.strip("[]").partition("%")[0])


def parse_cidr(text: str) -> IPNetwork:
    """An `--import-allow` range: `10.0.0.0/8`, `fd00::/8`, or one address."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"--import-allow {text!r} is not an address range: give one like 10.0.0.0/8, "
            "192.168.1.5/32 or fd00::/8"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
        mapped = network.network_address.ipv4_mapped
        return ipaddress.IPv4Network(f"{mapped}/{max(network.prefixlen - 96, 0)}", strict=False)
    return network


@dataclass(frozen=True)
class ImportPolicy:
    """`local_allowed`: loopback and this host's addresses may be reached (the server
    listens on loopback alone); `allow`: ranges opened whatever they hold."""

    local_allowed: bool
    allow: tuple[IPNetwork, ...] = ()
    host: Callable[[], HostAddresses] = field(default=host_addresses, compare=False)

    @classmethod
    def for_server(cls, loopback_only: bool, import_allow: Iterable[str]) -> ImportPolicy:
        """The policy of a server; ValueError names an `import_allow` that is no range."""
        return cls(loopback_only, tuple(parse_cidr(text) for text in import_allow))

    def refusal(self, address: IPAddress) -> str | None:
        """Why an import may not connect to `address`, or None when it may."""
        address = plain(address)
        if any(address in network for network in self.allow):
            return None
        if address.is_unspecified or address in _THIS_NETWORK:
            return "an unspecified address (0.0.0.0/8, ::), which reaches this host"
        if address.is_link_local:
            return "a link-local address (a cloud's metadata service answers on one)"
        if address.is_multicast:
            return "a multicast address"
        if address == _LIMITED_BROADCAST:
            return "a broadcast address"
        if self.local_allowed:
            return None
        if address.is_loopback:
            return (
                "a loopback address, reachable by imports only while the server listens on "
                "loopback alone"
            )
        host = self.host()
        if address in host.broadcast:
            return "the broadcast address of one of this host's networks"
        if address in host.local:
            return (
                "an address of this host, reachable by imports only while the server listens "
                "on loopback alone"
            )
        return None


class AddressRefused(OSError):
    """An import tried to connect where the policy forbids; the message says where, why,
    and how to allow it."""

    def __init__(self, address: IPAddress, why: str, host: str | None = None) -> None:
        judged = plain(address)
        single = 32 if isinstance(judged, ipaddress.IPv4Address) else 128
        named = str(address) if judged == address else f"{address} ({judged})"
        if host and host.strip("[]") != str(address):
            named = f"{host} resolves to {named}"
        super().__init__(
            f"imports may not connect to {named}: {why}; start the server with "
            f"--import-allow {judged}/{single} to allow it"
        )


def refusal_in(exc: BaseException) -> AddressRefused | None:
    """The AddressRefused behind an aiohttp connection error, if that is what it was."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, AddressRefused):
            return current
        seen.add(id(current))
        inner = getattr(current, "os_error", None)
        current = inner if isinstance(inner, BaseException) else current.__cause__
    return None


class AddressGuard:
    """Applies an ImportPolicy to the connections of aiohttp sessions (see the module)."""

    def __init__(self, policy: ImportPolicy) -> None:
        self.policy = policy

    def check(self, address: str, host: str | None = None) -> None:
        """Raises AddressRefused when the policy forbids `address` (`host`: the name it
        was resolved from, for the message)."""
        parsed = parse_address(address)
        why = self.policy.refusal(parsed)
        if why is not None:
            raise AddressRefused(parsed, why, host)

    def _socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        self.check(sockaddr[0])
        return socket.socket(family=family, type=kind, proto=proto)

    def connector(self, **options: Any) -> aiohttp.TCPConnector:
        """A TCPConnector (`options` as its own) that connects only where the policy allows."""
        return aiohttp.TCPConnector(
            resolver=GuardedResolver(self), socket_factory=self._socket, **options
        )


def connector(guard: AddressGuard | None, **options: Any) -> aiohttp.TCPConnector:
    """A TCPConnector (`options` as its own) that goes only where `guard` allows, or
    anywhere without one."""
    if guard is None:
        return aiohttp.TCPConnector(**options)
    return guard.connector(**options)


class GuardedResolver(AbstractResolver):
    """The default resolver, keeping only the addresses the guard allows."""

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard
        self._resolver = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        refused: AddressRefused | None = None
        for result in found:
            try:
                self._guard.check(result["host"], host)
            except AddressRefused as exc:
                refused = refused or exc
            else:
                allowed.append(result)
        if not allowed and refused is not None:
            raise refused
        return allowed

    async def close(self) -> None:
        await self._resolver.close()
