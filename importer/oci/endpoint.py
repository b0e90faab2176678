"""Where and how a registry is reached: the scheme of a registry named without one, and
the TLS settings of HTTPS (`tls_context`).

The rule is Docker's:

- `http://HOST[:PORT]` and `https://HOST[:PORT]` are used exactly as given.
- `HOST[:PORT]` without a scheme is reached over HTTPS (port 443 when none is given).
- When HTTPS fails at the connection or TLS level (refused, reset, a failed handshake or
  certificate check, no answer in time), plain HTTP is tried instead (port 80 when none is
  given), but only when the host is a loopback address (127.0.0.0/8, ::1, localhost) or the
  caller passed `insecure=True`. An HTTP answer over HTTPS, whatever its status (200, 401,
  404, ...), settles it: the registry speaks HTTPS and no fallback happens. So does a
  certificate that fails verification (the handshake got that far: the registry speaks
  TLS, and plain HTTP would only hide the real problem); pass the CA bundle, or insecure.

The decision is made once per client by `GET /v2/` (401 counts as reachable), on the
client's first request: `RegistryClient("127.0.0.1:5000")` works as is, and
`connect_registry()` (importer/oci/registry.py) makes the decision up front so that an
unreachable registry shows up at once. `resolve_registry_url()` answers the URL alone, for
callers that only need it.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

import aiohttp
from yarl import URL

from importer.netguard import refusal_in
from importer.oci.errors import RegistryError, error_from_exception

PROBE_TIMEOUT = 30.0

# A failure of these kinds means "this scheme does not work here"; an HTTP answer never does.
_CONNECTION_FAILURES = (aiohttp.ClientConnectionError, TimeoutError)


@dataclass(frozen=True)
class Endpoint:
    """A registry as the user named it: `scheme` is None when none was written."""

    scheme: str | None
    url: URL  # with the scheme to try first (https when none was written)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        written = text.strip().rstrip("/")
        scheme: str | None = None
        if "://" in written:
            scheme = written.split("://", 1)[0].lower()
            candidate = written
        else:
            candidate = f"https://{written}"
        try:
            url = URL(candidate)
            valid = url.scheme in ("http", "https") and bool(url.host)
            url.port  # noqa: B018 - a port out of range or not a number raises here
        except ValueError:
            valid = False
        if not valid or url.query_string or url.fragment or url.user:
            raise RegistryError(
                f"{text!r} is not a registry (HOST[:PORT], http://... or https://...)"
            )
        return cls(scheme=scheme, url=url)

    @property
    def host(self) -> str:
        return self.url.host or ""

    @property
    def netloc(self) -> str:
        """`host:port` as written (brackets kept around an IPv6 address)."""
        return self.url.raw_authority

    def http_url(self) -> URL:
        return self.url.with_scheme("http")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z) and the name localhost."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def may_fall_back_to_http(host_or_url: str, *, insecure: bool) -> bool:
    """Whether plain HTTP may be tried after HTTPS failed to connect: never for an explicit
    scheme; for a name without one, on a loopback host or when `insecure` is set."""
    endpoint = Endpoint.parse(host_or_url)
    if endpoint.scheme is not None:
        return False
    return insecure or is_loopback(endpoint.host)


def registry_host(host_or_url: str) -> str:
    """The `host[:port]` of a registry (what docker config `auths` keys name)."""
    return Endpoint.parse(host_or_url).netloc


def tls_context(ca_bundle: bytes | None, insecure: bool) -> ssl.SSLContext | bool:
    """The TLS settings of a registry reached over HTTPS: the default trust store plus the
    PEM bundle when given; `False` skips verification (`insecure`)."""
    if insecure:
        return False
    context = ssl.create_default_context()
    if ca_bundle:
        try:
            context.load_verify_locations(cadata=ca_bundle.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise RegistryError(f"the registry CA bundle cannot be used: {exc}") from None
    return context


async def _probe(session: aiohttp.ClientSession, base: URL, timeout: float) -> None:
    """GET /v2/ and nothing more: any HTTP answer means the scheme works."""
    url = base.with_path(f"{base.path.rstrip('/')}/v2/")
    probe_timeout = aiohttp.ClientTimeout(total=timeout)
    async with session.get(url, timeout=probe_timeout, allow_redirects=False) as response:
        response.release()


def _detail(where: str, exc: BaseException) -> str:
    return error_from_exception("-", where, exc).message.removeprefix("-: ")


async def choose_url(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    *,
    insecure: bool,
    what: str,
    timeout: float = PROBE_TIMEOUT,
) -> URL:
    """The URL to use for `endpoint` (see the module's rule), probing with `session`.
    Raises RegistryError, prefixed with `what`, when no allowed scheme connects."""
    if endpoint.scheme is not None:
        return endpoint.url
    where = endpoint.netloc
    try:
        await _probe(session, endpoint.url, timeout)
        return endpoint.url
    except aiohttp.ClientConnectorCertificateError as exc:
        raise error_from_exception(what, where, exc) from None
    except _CONNECTION_FAILURES as exc:
        if refusal_in(exc) is not None:  # plain HTTP would go to the same address
            raise error_from_exception(what, where, exc) from None
        https_failure = _detail(where, exc)
    if not (insecure or is_loopback(endpoint.host)):
        raise RegistryError(
            f"{what}: {https_failure} (plain HTTP is tried only for a loopback or insecure "
            f"registry; name it http://{where} to use plain HTTP)"
        )
    http_url = endpoint.http_url()
    try:
        await _probe(session, http_url, timeout)
        return http_url
    except _CONNECTION_FAILURES as exc:
        http_failure = _detail(where, exc)
    raise RegistryError(f"{what}: over HTTPS: {https_failure}; over plain HTTP: {http_failure}")


async def resolve_registry_url(
    host_or_url: str,
    *,
    ca_bundle: bytes | None = None,
    insecure: bool = False,
    timeout: float = PROBE_TIMEOUT,
) -> str:
    """`http://...` or `https://...` for a registry named with or without a scheme (an
    explicit scheme is returned unchanged, without a request)."""
    endpoint = Endpoint.parse(host_or_url)
    if endpoint.scheme is not None:
        return str(endpoint.url)
    connector = aiohttp.TCPConnector(ssl=tls_context(ca_bundle, insecure))
    async with aiohttp.ClientSession(connector=connector) as session:
        url = await choose_url(
            session,
            endpoint,
            insecure=insecure,
            what=f"reaching the registry {endpoint.netloc}",
            timeout=timeout,
        )
    return str(url)
