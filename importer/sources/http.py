"""An image served over HTTP(S), streamed as it downloads, continued after a dropped
connection.

`async with HttpSource(url) as source:` then `source.length` (from Content-Length, None
when the server does not say) and `source.readinto(view)` until it returns 0.

What the reader sees is one stream, exactly the bytes an uninterrupted
download gives, whatever happens on the way:

- A failure to connect (refused, reset, timed out) and a 502, 503 or 504 answer are tried
  again, `retries` times in a row at most, waiting `backoff` seconds, then twice that, and
  so on up to 8 s. After that, `SourceUnreachable` says how many attempts were made and
  the last cause.
- When the connection drops in the middle of the body (or stalls for `read_timeout`
  seconds), the download goes on with `Range: bytes=N-` (N: the bytes already handed out)
  and `If-Range` with the first answer's strong ETag or else its Last-Modified, under the
  same retry budget. Only a `206` whose Content-Range starts at N and has the known total,
  and whose ETag and Last-Modified (when sent) are those of the first answer, is taken.
  Every drop after which some bytes arrived starts a new budget. `resumes` counts the
  continuations taken.
- When the download cannot be continued (the server does not advertise
  `Accept-Ranges: bytes`, sent no length or no validator, answers 200 or 416 to the range
  request, or its validators or Content-Range do not match), `SourceChanged` is raised:
  what was handed out so far must be thrown away and the transfer started again from
  byte 0 (`importer.transfer.run_transfer` does so, a bounded number of times).
- A 4xx answer (404, 403, ...), any other status >= 400 and a TLS failure (an unknown CA,
  a wrong name, a handshake error) end the download at once with `SourceUnreachable`
  naming the status or the TLS error.

Compression stays off (`Accept-Encoding: identity`, nothing decoded): the bytes are the
file as served, and offsets in Range requests are offsets in those bytes.

With a `guard` (importer/netguard.py), every connection, redirects and continuations
included, goes only where its policy allows; a refused address ends the download at once
with `SourceUnreachable`. Credentials in the URL (`user:pass@`) are sent, never shown:
messages and logs name the URL without them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from types import TracebackType

import aiohttp

from importer.errors import SourceUnreachable, StartOver
from importer.netguard import AddressGuard, connector, refusal_in
from importer.sources.reader import Reader
from importer.sources.transportbody import TransportBody, body_reader
from importer.urlredact import redact_url, redact_urls_in

log = logging.getLogger(__name__)

# aiohttp's read buffer per connection: the body is handed on in the pieces received, at
# most about this size each.
READ_BUFSIZE = 1 << 20
RETRY_STATUSES = frozenset({502, 503, 504})
MAX_BACKOFF = 8.0

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
# Worth another attempt: the connection, not the request, failed. TLS errors are
# ClientConnectorErrors too; they are told apart first and are final.
_TRANSIENT = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    OSError,  # TimeoutError among them
)


class SourceChanged(StartOver):
    """The download broke off and cannot be continued where it stopped: the server does
    not take range requests, or the file is not the one the download started with. The
    bytes handed out so far must be discarded and the whole transfer started over from
    byte 0 (a `SourceUnreachable`, and a `StartOver` for `run_transfer`)."""


class _Retry(Exception):
    """Internal: an attempt failed in a way that another attempt may fix."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def ssl_context(ca_bundle: bytes | None, insecure: bool = False) -> ssl.SSLContext | bool:
    """The default trust store, plus the PEM bundle when given; `False` skips verification.
    Without a bundle: `True`, aiohttp's own default context, made once per process (loading
    the system's CA store takes tens of milliseconds of the event loop's time)."""
    if insecure:
        return False
    if not ca_bundle:
        return True
    context = ssl.create_default_context()
    if ca_bundle:
        try:
            context.load_verify_locations(cadata=ca_bundle.decode())
        except (ssl.SSLError, ValueError) as exc:
            raise SourceUnreachable(f"the CA bundle cannot be used: {exc}") from None
    return context


class HttpSource:
    """`async with HttpSource(url) as source:` then `source.length` and `source.readinto()`.

    `retries`: how many failed attempts in a row (connecting, 502/503/504, a dropped
    body) are tried again; `backoff`: the first wait in seconds, doubled each time up to
    8 s. Raises `SourceUnreachable`, or `SourceChanged` when a dropped download must
    start over from byte 0.
    """

    def __init__(
        self,
        url: str,
        ca_bundle: bytes | None = None,
        insecure: bool = False,
        *,
        retries: int = 5,
        backoff: float = 0.5,
        connect_timeout: float = 30,
        read_timeout: float = 300,
        guard: AddressGuard | None = None,
    ) -> None:
        self.url = url
        self.shown_url = redact_url(url)  # what messages and logs name
        self._guard = guard
        self.retries = retries
        self.backoff = backoff
        self._ssl = ssl_context(ca_bundle, insecure)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._read_timeout = read_timeout
        self._response: aiohttp.ClientResponse | None = None
        self._body: Reader | None = None  # the current response's body
        self._progressed = False  # bytes came since the current response was opened
        self.length: int | None = None
        self.resumes = 0  # continuations with a Range request that were taken
        self.etag: str | None = None  # the first answer's, when strong
        self._first_etag: str | None = None  # the first answer's, weak or strong
        self.last_modified: str | None = None
        self._accepts_ranges = False
        self._received = 0  # bytes handed out by readinto()
        self._end = 0  # where the body of the current response ends, when known
        self._failures = 0  # failed attempts in a row

    async def __aenter__(self) -> HttpSource:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            connector=connector(self._guard, ssl=self._ssl),
            auto_decompress=False,
            read_bufsize=READ_BUFSIZE,
        )
        try:
            response = await self._open(None)
        except BaseException:
            await self._close()
            raise
        self._take(response)
        self.length = response.content_length
        self._end = self.length or 0
        headers = response.headers
        self._first_etag = headers.get("ETag")
        strong = self._first_etag and not self._first_etag.startswith("W/")
        self.etag = self._first_etag if strong else None  # a validator for If-Range
        self.last_modified = headers.get("Last-Modified")
        units = headers.get("Accept-Ranges", "").lower()
        self._accepts_ranges = "bytes" in (u.strip() for u in units.split(","))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        self._close_response()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def readinto(self, view: memoryview) -> int:
        """The download's next bytes into the front of `view`; 0 at its end (a Reader)."""
        assert self._body is not None, "use `async with HttpSource(...)` first"
        while True:
            ended = False
            try:
                async with asyncio.timeout(self._read_timeout):
                    n = await self._body.readinto(view)
            except _TRANSIENT as exc:
                cause = f"the connection broke off: {_describe(exc)}"
            else:
                if n:
                    self._received += n
                    self._progressed = True
                    return n
                ended = True
                cause = f"the body ended after {self._received} of {self.length} bytes"
            if self.length is None and ended:
                return 0  # no length to check against: the end of the body is the end
            if self._received == self.length:
                return 0  # every byte is in (perhaps the end of the message was lost)
            if self.length is not None and self._received > self.length:
                raise SourceUnreachable(
                    f"{self.shown_url} sent more than the {self.length} bytes it announced"
                )
            await self._continue(cause)

    async def _continue(self, cause: str) -> None:
        """After the body broke off: the rest with a Range request, or SourceChanged."""
        self._close_response()
        if self._progressed:
            self._failures = 0
        short_range = self._progressed and self._received == self._end
        self._check_resumable(cause)
        if not short_range:  # a 206 that sent less than asked goes on at once
            await self._wait_before_retry(cause, self._received)
        self._take(await self._open(self._received))

    def _take(self, response: aiohttp.ClientResponse) -> None:
        """Reads `response`'s body from now on."""
        self._response = response
        self._progressed = False
        self._body = _body_of(response)

    def _close_response(self) -> None:
        if isinstance(self._body, TransportBody):
            self._body.release()
        self._body = None
        if self._response is not None:
            self._response.close()  # closed, not put back: its body may not be read to the end
            self._response = None

    def _check_resumable(self, cause: str) -> None:
        why = None
        if self.length is None:
            why = "the server did not send its length"
        elif not self._accepts_ranges:
            why = "the server does not advertise Accept-Ranges: bytes"
        elif self.etag is None and self.last_modified is None:
            why = "the server sent neither a strong ETag nor Last-Modified to check it against"
        if why is not None:
            raise self._changed(cause, why)

    def _changed(self, cause: str, why: str) -> SourceChanged:
        return SourceChanged(
            f"the download of {self.shown_url} stopped at byte {self._received} ({cause}) and "
            f"cannot be continued: {why}; starting over"
        )

    async def _wait_before_retry(self, cause: str, offset: int) -> None:
        self._failures += 1
        if self._failures > self.retries:
            attempts = "1 attempt" if self._failures == 1 else f"{self._failures} attempts"
            at = f" at byte {offset}" if offset else ""
            raise SourceUnreachable(f"gave up on {self.shown_url}{at} after {attempts}: {cause}")
        delay = min(self.backoff * 2 ** (self._failures - 1), MAX_BACKOFF)
        log.info(
            "%s: %s; trying again at byte %d in %.1f s (retry %d of %d)",
            self.shown_url,
            cause,
            offset,
            delay,
            self._failures,
            self.retries,
        )
        await asyncio.sleep(delay)

    async def _open(self, offset: int | None) -> aiohttp.ClientResponse:
        """The first GET (`offset` None) or a continuation from byte `offset` (a Range
        request, also from byte 0: it checks that the file is still the same), tried again
        while it fails in a transient way."""
        while True:
            try:
                return await self._get(offset)
            except _Retry as exc:
                await self._wait_before_retry(exc.cause, offset or 0)

    async def _get(self, offset: int | None) -> aiohttp.ClientResponse:
        assert self._session is not None
        headers = {"Accept-Encoding": "identity"}
        if offset is not None:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = self.etag or self.last_modified or ""
        try:
            # Continuations go to the URL given, not to where it redirected to: a
            # redirect often leads to a signed URL that expires (object stores, release
            # downloads) and is made anew on each request. The validators and the
            # Content-Range check catch a redirect to a different file.
            response = await self._session.get(self.url, headers=headers)
        except aiohttp.ClientSSLError as exc:
            raise SourceUnreachable(f"TLS with {self.shown_url} failed: {_describe(exc)}") from None
        except _TRANSIENT as exc:
            refused = refusal_in(exc)
            if refused is not None:
                raise SourceUnreachable(f"cannot reach {self.shown_url}: {refused}") from None
            raise _Retry(f"cannot reach {self.shown_url}: {_describe(exc)}") from None
        except aiohttp.ClientError as exc:  # invalid URL, too many redirects, bad answer
            raise SourceUnreachable(f"cannot download {self.shown_url}: {_describe(exc)}") from None
        status = f"{response.status} {response.reason or ''}".strip()
        if response.status in RETRY_STATUSES:
            response.close()
            raise _Retry(f"{self.shown_url} answered {status}")
        if offset is not None and response.status in (412, 416):
            response.close()
            raise self._changed(f"continuing at {offset}", f"the server answered {status}")
        if response.status >= 400:
            response.close()
            raise SourceUnreachable(f"{self.shown_url} answered {status}")
        if offset is not None:
            try:
                self._check_continuation(response, offset, status)
            except SourceChanged:
                response.close()
                raise
            self.resumes += 1
        return response

    def _check_continuation(
        self, response: aiohttp.ClientResponse, offset: int, status: str
    ) -> None:
        """A 206 for exactly the rest of the same file, or SourceChanged."""

        def changed(why: str) -> SourceChanged:
            return self._changed(f"continuing at {offset}", why)

        if response.status == 200:
            raise changed(
                "the server answered the range request with 200 and the whole file "
                "(it ignores ranges, or the file changed)"
            )
        if response.status != 206:
            raise changed(f"the server answered the range request with {status}")
        etag = response.headers.get("ETag")
        if etag is not None and etag != self._first_etag:
            raise changed(f"the ETag changed from {self._first_etag} to {etag}")
        last_modified = response.headers.get("Last-Modified")
        if last_modified is not None and last_modified != self.last_modified:
            raise changed(f"Last-Modified changed from {self.last_modified} to {last_modified}")
        content_range = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.match(content_range)
        if match is None:
            raise changed(f"the 206 answer has no usable Content-Range ({content_range!r})")
        first, last, total = int(match[1]), int(match[2]), match[3]
        if first != offset or total != str(self.length) or not first <= last < (self.length or 0):
            raise changed(
                f"the server sent Content-Range {content_range!r} for bytes={offset}- "
                f"of {self.length} bytes"
            )
        size = response.content_length
        if size is not None and size != last + 1 - first:
            raise changed(f"Content-Length {size} does not match Content-Range {content_range!r}")
        self._end = last + 1


def _body_of(response: aiohttp.ClientResponse) -> Reader:
    """A long body is received straight into the reader's buffers; its connection is
    closed afterwards, not put back in the pool."""
    connection = response.connection
    chunked = "Transfer-Encoding" in response.headers
    return body_reader(
        response.content,
        connection.transport if connection is not None else None,
        None if chunked else response.content_length,
    )


def _describe(exc: BaseException) -> str:
    """The exception's message, or its type when it has none (timeouts), without the
    credentials of any URL it quotes."""
    text = str(exc)
    return redact_urls_in(text) if text else type(exc).__name__
