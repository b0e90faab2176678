"""One aiohttp session to one registry: URLs, TLS, auth retries and error translation.

The base may be a name without a scheme (`host:port`): the scheme is then decided on the
first request, by the rule of importer/oci/endpoint.py (HTTPS, or plain HTTP after a
connection failure on a loopback or insecure registry). With a `guard`
(importer/netguard.py), every connection of the session goes only where it allows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from importer.netguard import AddressGuard, connector
from importer.oci.auth import Credentials
from importer.oci.authorizer import Authorizer
from importer.oci.challenge import parse_challenges
from importer.oci.endpoint import Endpoint, choose_url, tls_context
from importer.oci.errors import RegistryError, error_from_answer, error_from_exception

CONNECT_TIMEOUT = 30.0
DEFAULT_IO_TIMEOUT = 300.0


def with_query_param(url: URL, name: str, value: str) -> URL:
    """Adds one parameter and leaves the others byte for byte: the registry signs `_state`."""
    text = str(url)
    separator = "&" if url.raw_query_string else ("" if text.endswith("?") else "?")
    return URL(f"{text}{separator}{name}={quote(value, safe=':')}", encoded=True)


class Transport:
    def __init__(
        self,
        base_url: str,
        *,
        credentials: Credentials | None,
        ca_bundle: bytes | None,
        insecure: bool,
        io_timeout: float,
        guard: AddressGuard | None = None,
    ) -> None:
        self.endpoint = Endpoint.parse(base_url)
        self._guard = guard
        # Until the scheme of a name without one is decided, this is its https:// URL.
        self.base_url = self.endpoint.url
        self.io_timeout = io_timeout
        self._insecure = insecure
        self._scheme_decided = self.endpoint.scheme is not None
        self._deciding = asyncio.Lock()
        self._tls = tls_context(ca_bundle, insecure) if self.base_url.scheme == "https" else True
        self._session: aiohttp.ClientSession | None = None
        self.authorizer = Authorizer(credentials, self.session)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=connector(self._guard, ssl=self._tls),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=CONNECT_TIMEOUT,
                    sock_connect=CONNECT_TIMEOUT,
                    sock_read=self.io_timeout,
                ),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def decide_scheme(self, what: str) -> URL:
        """The base URL, probing once for a name written without a scheme."""
        if not self._scheme_decided:
            async with self._deciding:
                if not self._scheme_decided:
                    self.base_url = await choose_url(
                        self.session(), self.endpoint, insecure=self._insecure, what=what
                    )
                    self._scheme_decided = True
        return self.base_url

    def _rebased(self, url: URL) -> URL:
        """A URL built from the provisional https:// base, moved to the decided scheme."""
        if url.scheme != self.base_url.scheme and url.origin() == self.endpoint.url.origin():
            return url.with_scheme(self.base_url.scheme)
        return url

    def url(self, path: str) -> URL:
        return self.base_url.with_path(f"{self.base_url.path.rstrip('/')}/v2/{path}")

    def location(self, response: aiohttp.ClientResponse, what: str) -> URL:
        """The response's Location, resolved against the request (it may be relative)."""
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"{what}: the registry's answer has no Location")
        return response.url.join(URL(location, encoded=True))

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: URL,
        *,
        what: str,
        scope: Sequence[str],
        ok: Collection[int],
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        replayable: bool = True,
        timeout: aiohttp.ClientTimeout | None = None,
        raw: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Sends a request with whatever auth the registry wants, retrying once after a 401
        when the request can be replayed; an answer outside `ok` raises RegistryError. `raw`
        keeps a Content-Encoding as sent (a blob's digest is over the stored bytes)."""
        if self.endpoint.scheme is None:
            await self.decide_scheme(what)
            url = self._rebased(url)
        where = f"{self.base_url.host}:{self.base_url.port}"
        sent = await self.authorizer.header(scope, what)
        options: dict[str, Any] = {"data": data}
        if timeout is not None:
            options["timeout"] = timeout
        if raw:
            options["auto_decompress"] = False
        response = await self._send(method, url, headers, sent, options, what, where)
        try:
            if response.status == 401 and replayable:
                challenges = parse_challenges(response.headers.getall("WWW-Authenticate", []))
                retry_with = await self.authorizer.answer(challenges, scope, sent, what)
                if retry_with is not None:
                    response.release()
                    response = await self._send(
                        method, url, headers, retry_with, options, what, where
                    )
            if response.status not in ok:
                body = await self._read_error_body(response)
                raise error_from_answer(what, response.status, response.reason, body)
            yield response
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise error_from_exception(what, where, exc) from None
        finally:
            response.release()

    async def _send(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str] | None,
        authorization: str | None,
        options: dict[str, Any],
        what: str,
        where: str,
    ) -> aiohttp.ClientResponse:
        all_headers = dict(headers or {})
        if authorization:
            all_headers["Authorization"] = authorization
        try:
            return await self.session().request(method, url, headers=all_headers, **options)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise error_from_exception(what, where, exc) from None

    @staticmethod
    async def _read_error_body(response: aiohttp.ClientResponse) -> bytes:
        try:
            return await response.content.read(64 * 1024)
        except (TimeoutError, aiohttp.ClientError):
            return b""
