"""An image served over HTTP(S), streamed as it downloads."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from types import TracebackType

import aiohttp

from importer.errors import SourceUnreachable

READ_CHUNK = 1 << 20


def ssl_context(ca_bundle: bytes | None, insecure: bool = False) -> ssl.SSLContext | bool:
    """The default trust store, plus the PEM bundle when given; `False` skips verification."""
    if insecure:
        return False
    context = ssl.create_default_context()
    if ca_bundle:
        try:
            context.load_verify_locations(cadata=ca_bundle.decode())
        except (ssl.SSLError, ValueError) as exc:
            raise SourceUnreachable(f"the CA bundle cannot be used: {exc}") from None
    return context


class HttpSource:
    """`async with HttpSource(url) as source:` then `source.length` and `source.chunks()`."""

    def __init__(self, url: str, ca_bundle: bytes | None = None, insecure: bool = False) -> None:
        self.url = url
        self._ssl = ssl_context(ca_bundle, insecure)
        self._session: aiohttp.ClientSession | None = None
        self._response: aiohttp.ClientResponse | None = None
        self.length: int | None = None

    async def __aenter__(self) -> HttpSource:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(ssl=self._ssl)
        )
        try:
            self._response = await self._session.get(self.url, auto_decompress=False)
        except aiohttp.ClientConnectorCertificateError as exc:
            await self._close()
            raise SourceUnreachable(f"TLS verification of {self.url} failed: {exc}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await self._close()
            raise SourceUnreachable(f"cannot reach {self.url}: {exc}") from None
        if self._response.status >= 400:
            status = f"{self._response.status} {self._response.reason}"
            await self._close()
            raise SourceUnreachable(f"{self.url} answered {status}")
        self.length = self._response.content_length
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._response is not None:
            self._response.release()
        if self._session is not None:
            await self._session.close()

    async def chunks(self) -> AsyncIterator[bytes]:
        assert self._response is not None
        received = 0
        try:
            async for chunk in self._response.content.iter_chunked(READ_CHUNK):
                received += len(chunk)
                yield chunk
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise SourceUnreachable(
                f"the download of {self.url} broke off after {received} bytes: {exc}"
            ) from None
        if self.length is not None and received != self.length:
            raise SourceUnreachable(
                f"the download of {self.url} ended after {received} of {self.length} bytes"
            )
