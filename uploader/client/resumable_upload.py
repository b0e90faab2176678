"""`dvcr-uploader upload FILE URL`: send a file to an upload URL with a progress bar, and
carry on where the server stopped when the connection breaks (README: "When the connection drops").

A file goes up with `PUT`. When the connection fails, or the server answers that sending
again may help, `HEAD` tells how many bytes the server has safely taken (`Upload-Offset`)
and the next `PUT` continues there with `Content-Range: bytes N-LAST/SIZE`. A failed try
waits longer each time; the count starts over whenever the server's offset moved on, so
a long upload over a flaky link keeps going. Once the server has every byte, `GET` tells
when it has finished the image. A pipe cannot be read twice: it is sent once, with no resume.

Only what another try can fix is tried again: a connection that broke, a timeout, a proxy's
502, 503 or 504 (and a 500 a couple of times). A wrong token or any other refusal, a server
that cannot be reached on the first try, and a TLS error end the upload at once.

The file's sha256 is computed while it goes up (uploader.client.filehash), the part sent by earlier
tries or runs included, and the result tells it along with the server's answer, for the
caller to compare with the image's. An image that is already Ready takes nothing: the result
says so (`already`), and the file is hashed all the same. Standard input is hashed as it is
read; when it finds the image Ready, the rest of it is read, unsent, for the hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Never

import aiohttp
from multidict import CIMultiDictProxy
from tqdm import tqdm

from uploader.client.credentials import describe_tls_error
from uploader.client.filehash import FileHasher, StreamHasher

CHUNK = 1 << 20
MAX_WAIT = 30.0  # the longest pause between tries, seconds (unless --retry-wait is longer)
STALL_TIMEOUT = 60.0  # the connection took no byte of the body for this long: it is dead
FINISH_TIMEOUT = 600.0  # the server has every byte; it finishes the image within this
POLL_INTERVAL = 1.0
LOOK_TIMEOUT = aiohttp.ClientTimeout(total=30)  # HEAD and GET
NETWORK_ERRORS = (TimeoutError, aiohttp.ClientError, OSError)
PROXY_ERRORS = (502, 503, 504)  # a proxy or a server going down: worth the whole budget
SERVER_ERROR_TRIES = 2  # a 500 is tried again this often, in case it passes

EXIT_OK = 0
EXIT_REFUSED = 1  # the server refused or failed the image; sending again will not help
EXIT_NETWORK = 3  # the connection failed; sending again may help


class UploadFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass
class UploadResult:
    answer: dict[str, Any]  # the server's last JSON answer: phase, offset, checksum...
    sha256: str  # of the file, as read
    already: bool  # the image was Ready before this run sent it anything


class _Retry(Exception):
    """A try failed in a way that sending again may help; the text says what happened.
    `limit`: the most tries this failure is worth, when fewer than --retries."""

    def __init__(self, message: str, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit


async def upload(
    path: str,
    url: str,
    *,
    quiet: bool = False,
    tls: ssl.SSLContext | None = None,
    retries: int = 10,
    retry_wait: float = 1.0,
) -> UploadResult:
    """Sends the file, continuing after failures; returns the server's answer and the
    file's sha256. `tls`: how to check the server's certificate (None: the system's CAs).
    Raises UploadFailed."""
    if not url.startswith(("http://", "https://")):
        raise UploadFailed(f"{url!r} is not an http:// or https:// URL", EXIT_REFUSED)
    stdin = path == "-"
    try:
        stream: BinaryIO = sys.stdin.buffer if stdin else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise UploadFailed(f"cannot read {path}: {exc.strerror or exc}", EXIT_REFUSED) from None
    try:
        # A pipe or a device is read once, as it comes; a regular file can be read again.
        info = os.fstat(stream.fileno())
        size = info.st_size if stat.S_ISREG(info.st_mode) else None
        bar = tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=quiet,
            desc="stdin" if stdin else os.path.basename(path),
            file=sys.stderr,
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
        connector = aiohttp.TCPConnector(ssl=tls if tls is not None else True)
        hasher = FileHasher(stream.fileno(), size) if size is not None else StreamHasher(stream)
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                # aiohttp before 3.14.5 sends a PUT again by itself when its connection
                # breaks, with the rest of a body already partly sent as the whole body:
                # the server would take the wrong bytes at the offset. Every try is ours.
                session._retry_connection = False
                job = _Upload(session, url, path, stream, size, bar, hasher)
                if size is None:
                    answer = await job.send_once()
                else:
                    answer = await job.run(max(0, retries), max(0.0, retry_wait))
            bar.close()
            return UploadResult(answer, await job.sha256(), job.already)
        finally:
            hasher.close()
            bar.close()
    finally:
        if not stdin:
            stream.close()


class _Upload:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        path: str,
        stream: BinaryIO,
        size: int | None,
        bar: tqdm[Never],  # a bar over no iterable: update() counts the bytes
        hasher: FileHasher | StreamHasher,
    ) -> None:
        self.session = session
        self.url = url
        self.path = path
        self.stream = stream
        self.size = size
        self.bar = bar
        self.hasher = hasher
        self.file_state = _file_state(stream)
        self.offset: int | None = None  # what the server last said it has
        self.best = 0  # the most it ever said it has
        self.asked = False  # whether it ever said
        self.tries = 0  # failed tries since the server's offset last moved on
        self.sent = 0  # where in the file the connection of the PUT under way is
        self.deadline: asyncio.Timeout | None = None  # of the PUT under way
        self.timeout_reason = ""
        self.reached = False  # whether the server ever answered in this run
        self.already = False  # the image was Ready before this run sent it anything

    async def sha256(self) -> str:
        try:
            if isinstance(self.hasher, FileHasher):
                return await self.hasher.hexdigest()
            if self.already:  # what was not sent still counts
                return await self.hasher.hexdigest_of_the_rest()
            return self.hasher.hexdigest()
        except OSError as exc:
            raise UploadFailed(
                f"cannot read {self.path}: {exc.strerror or exc}", EXIT_REFUSED
            ) from None

    # -- the whole upload -----------------------------------------------------------------

    async def send_once(self) -> dict[str, Any]:
        """A pipe (or a device): one PUT from byte 0, no second try."""
        try:
            return await self._put(0)
        except _Retry as failure:
            what = "standard input" if self.path == "-" else self.path
            raise UploadFailed(
                f"upload failed: {failure}; {what} can be read only once, so the upload "
                "cannot be resumed (save it to a file and upload the file to be able to "
                "continue after a failure)",
                EXIT_NETWORK,
            ) from None

    async def run(self, retries: int, retry_wait: float) -> dict[str, Any]:
        while True:
            try:
                return await self._attempt()
            except _Retry as failure:
                await self._pause(failure, retries, retry_wait)

    async def _attempt(self) -> dict[str, Any]:
        assert self.size is not None
        first = not self.asked
        offset = await self._head()
        if offset == self.size and self.size > 0:
            self.already = self.already or first
            return await self._wait_until_done()
        return await self._put(offset)

    async def _pause(self, failure: _Retry, retries: int, retry_wait: float) -> None:
        """Counts the failed try, says what happened and where the upload goes on, and
        waits; raises UploadFailed when the tries are used up."""
        try:
            offset: int | None = await self._head()
        except _Retry:
            offset = None
        self.tries += 1
        if failure.limit is not None:
            retries = min(retries, failure.limit)
        if self.tries > retries:
            raise self._give_up(failure, retries)
        wait = min(retry_wait * 2 ** (self.tries - 1), max(MAX_WAIT, retry_wait))
        where = "trying again" if offset is None else f"resuming at {_size(offset)}"
        tqdm.write(
            f"{failure}; {where} in {wait:g} s (try {self.tries} of {retries})", file=sys.stderr
        )
        await asyncio.sleep(wait)
        self.bar.unpause()  # the pause is not transfer time: keep it out of speed and ETA

    def _give_up(self, failure: _Retry, retries: int) -> UploadFailed:
        assert self.size is not None
        offset = self.offset if self.offset is not None else self.best
        has = f"the server had {offset} bytes when last asked" if self.asked else ""
        if self.offset is not None:
            how = f"curl -C {offset} -T {self.path} {self.url}"
        else:
            how = f"curl -C N -T {self.path} {self.url}, N being the Upload-Offset of curl -I URL"
        return UploadFailed(
            f"upload stopped at {_size(offset)} of {_size(self.size)} after {retries} "
            f"{'retry' if retries == 1 else 'retries'}: {failure}{'; ' + has if has else ''}. "
            f"To continue, run the same command again, or: {how}",
            EXIT_NETWORK,
        )

    def _learned(self, offset: int) -> None:
        """The server said it has `offset` bytes; progress starts the tries over."""
        if not self.asked:  # bytes sent before this run are not this run's speed
            self.bar.initial = offset
        self.offset = offset
        self.asked = True
        if offset > self.best:
            self.best = offset
            self.tries = 0
        self._move_bar(offset)

    def _move_bar(self, offset: int) -> None:
        """Sets the bar to the server's offset without counting the jump as speed."""
        self.bar.n = self.bar.last_print_n = offset
        self.bar.refresh()

    # -- requests -------------------------------------------------------------------------

    async def _head(self) -> int:
        """`HEAD`: the bytes the server has safely taken."""
        self.offset = None
        try:
            async with self.session.head(self.url, timeout=LOOK_TIMEOUT) as response:
                status, reason, headers = response.status, response.reason, response.headers
        except NETWORK_ERRORS as exc:
            raise self._network_failure("cannot reach the server", exc) from None
        self.reached = True
        if status >= 300:
            text = "" if status >= 500 or status == 408 else await self._message_text()
            raise _answer_failure(status, reason, headers, text)
        offset = _header_int(headers, "Upload-Offset", 0)
        length = _header_int(headers, "Upload-Length", None)
        assert offset is not None and self.size is not None
        if (length is not None and length != self.size) or offset > self.size:
            if (await self._look()).get("phase") == "Ready":
                raise UploadFailed(
                    f"the image is already Ready and holds another file: {length} bytes, "
                    f"{self.path} has {self.size}",
                    EXIT_REFUSED,
                )
            raise UploadFailed(
                f"the upload URL expects a different file: the server has {offset} bytes of "
                f"{length if length is not None else 'an unknown number'}, "
                f"{self.path} has {self.size}",
                EXIT_REFUSED,
            )
        self._learned(offset)
        return offset

    async def _message_text(self) -> str:
        """A HEAD answer has no body: the server's words come from GET."""
        try:
            async with self.session.get(self.url, timeout=LOOK_TIMEOUT) as response:
                return await response.text()
        except NETWORK_ERRORS:
            return ""

    async def _look(self) -> dict[str, Any]:
        """`GET`, for what it tells when it can: {} on any failure."""
        try:
            async with self.session.get(self.url, timeout=LOOK_TIMEOUT) as response:
                return _json(await response.text()) if response.status == 200 else {}
        except NETWORK_ERRORS:
            return {}

    async def _put(self, offset: int) -> dict[str, Any]:
        """`PUT` of the file from `offset` to its end (a pipe: all of it)."""
        headers = {"Content-Type": "application/octet-stream"}
        if self.size is not None:
            self._check_file()
            self.sent = offset
            self._move_bar(offset)
            headers["Content-Length"] = str(self.size - offset)
            if offset > 0:
                headers["Content-Range"] = f"bytes {offset}-{self.size - 1}/{self.size}"
        try:
            async with asyncio.timeout(None) as self.deadline:
                self._postpone(STALL_TIMEOUT, f"no answer for {STALL_TIMEOUT:g} s")
                body = self._body(offset)
                async with self.session.put(self.url, data=body, headers=headers) as response:
                    self._postpone(None)
                    text = await response.text()
        except NETWORK_ERRORS as exc:
            self._check_file()
            what = f"connection lost at {_size(self.sent)}"
            raise self._network_failure(what, exc, self.timeout_reason) from None
        self.reached = True
        if response.status == 409 and "Upload-Offset" not in response.headers:
            answer = await self._look()  # the image may be Ready: then nothing is missing
            if answer.get("phase") == "Ready":
                self.already = True
                return answer
        if response.status >= 300:
            raise _answer_failure(response.status, response.reason, response.headers, text)
        if response.status == 204:  # the server took the bytes and waits for more
            raise _Retry("the server answered 204: it does not have the whole image")
        return _json(text)

    async def _body(self, offset: int) -> AsyncIterator[bytes]:
        """The file from `offset`, read as the connection takes it. A connection that
        takes nothing for STALL_TIMEOUT is given up; reading the file does not count."""
        left = None if self.size is None else self.size - offset
        position = offset
        while left is None or left > 0:
            self._postpone(None)
            chunk = await self._read(position, CHUNK if left is None else min(CHUNK, left))
            position += len(chunk)
            if not chunk:
                break  # the end of a pipe (a file that got shorter is caught by _check_file)
            self._postpone(STALL_TIMEOUT, f"the connection took no data for {STALL_TIMEOUT:g} s")
            yield chunk
            self.sent += len(chunk)
            self.bar.update(len(chunk))
            if left is not None:
                left -= len(chunk)
        self._postpone(FINISH_TIMEOUT, f"no answer {FINISH_TIMEOUT:g} s after the last byte")

    async def _read(self, position: int, size: int) -> bytes:
        """A file is read by position (an earlier PUT's read may still be running), and
        its hasher may follow up to there; a stream is read, and hashed, in order."""
        if isinstance(self.hasher, StreamHasher):
            return await self.hasher.read(size)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, os.pread, self.stream.fileno(), size, position)
        self.hasher.allow(position + len(data))
        return data

    def _postpone(self, seconds: float | None, reason: str = "") -> None:
        """Moves the PUT's deadline to `seconds` from now (None: no deadline)."""
        self.timeout_reason = reason
        # The body can still be asked for while the PUT ends; its deadline is gone then.
        with contextlib.suppress(AttributeError, RuntimeError):
            when = None if seconds is None else asyncio.get_running_loop().time() + seconds
            self.deadline.reschedule(when)  # type: ignore[union-attr]

    async def _wait_until_done(self) -> dict[str, Any]:
        """The server has every byte: `GET` until it says the image is Ready or Failed."""
        try:
            async with asyncio.timeout(FINISH_TIMEOUT):
                while True:
                    answer = await self._get()
                    phase = answer.get("phase")
                    if phase == "Ready":
                        return answer
                    if phase == "Failed":
                        raise UploadFailed(_failed_image(answer), EXIT_REFUSED)
                    if phase == "WaitForUserUpload" and answer.get("offset", 0) < (self.size or 0):
                        raise _Retry(f"the server has only {answer.get('offset')} bytes")
                    await asyncio.sleep(POLL_INTERVAL)
        except TimeoutError:
            raise _Retry(
                f"the server did not finish the image within {FINISH_TIMEOUT:g} s"
            ) from None

    async def _get(self) -> dict[str, Any]:
        try:
            async with self.session.get(self.url, timeout=LOOK_TIMEOUT) as response:
                text = await response.text()
        except NETWORK_ERRORS as exc:
            raise self._network_failure("cannot reach the server", exc) from None
        self.reached = True
        if response.status >= 300:
            raise _answer_failure(response.status, response.reason, response.headers, text)
        return _json(text)

    def _network_failure(
        self, what: str, exc: BaseException, timeout_reason: str = "no answer"
    ) -> Exception:
        """_Retry, or UploadFailed for what another try cannot fix: TLS, and a server that
        could not be reached at all in this run (a wrong port, a server that is not up)."""
        if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
            return UploadFailed(
                f"TLS error with {_origin(self.url)}: {_tls_reason(exc)}", EXIT_REFUSED
            )
        if isinstance(exc, aiohttp.ClientConnectorError) and not self.reached:
            reason = _os_reason(exc.os_error)
            return UploadFailed(
                f"cannot reach the server at {_origin(self.url)}: {reason}", EXIT_NETWORK
            )
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror  # "Connection reset by peer" rather than aiohttp's wrapper
        elif isinstance(exc, TimeoutError) and not str(exc):
            reason = timeout_reason
        else:
            reason = str(exc).removeprefix("[Errno None] ") or type(exc).__name__
        return _Retry(f"{what} ({reason.replace(f' for {self.url}', '')})")

    def _check_file(self) -> None:
        """Continuing is only right when the file is the one the upload started with."""
        if self.size is not None and _file_state(self.stream) != self.file_state:
            raise UploadFailed(
                f"{self.path} changed while it was being uploaded; the server's copy would "
                "mix two versions of it",
                EXIT_REFUSED,
            )


# -- answers ------------------------------------------------------------------------------


def _answer_failure(
    status: int, http_reason: str | None, headers: CIMultiDictProxy[str], text: str
) -> Exception:
    """The error for an answer of 300 or more: _Retry when sending again may help."""
    answer = _json(text)
    reason = answer.get("reason") or http_reason or ""
    message = answer.get("message") or text.strip()
    described = f"{status} {reason}: {message}" if message else f"{status} {reason}"
    if status == 410:  # the image failed: its reason and message say why
        return UploadFailed(_failed_image(answer), EXIT_REFUSED)
    if (
        status in PROXY_ERRORS
        or status == 408
        or (status == 409 and ("in progress" in message or "shutting down" in message))
        or (status in (409, 416) and "Upload-Offset" in headers)
    ):
        return _Retry(f"the server answered {described}")
    if status == 500:
        return _Retry(f"the server answered {described}", limit=SERVER_ERROR_TRIES)
    if status > 500:
        return UploadFailed(f"the server failed ({described})", EXIT_REFUSED)
    return UploadFailed(f"upload refused ({described})", EXIT_REFUSED)


def _failed_image(answer: dict[str, Any]) -> str:
    """What a Failed image's answer says: its reason and message."""
    reason = answer.get("reason") or "Failed"
    message = answer.get("message") or "the server gives no reason"
    return f"the image failed ({reason}): {message}"


def _origin(url: str) -> str:
    """`https://host:port` of a URL: its upload token stays out of messages about the
    connection."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _os_reason(error: OSError) -> str:
    """The reason as the system says it: "Connection refused", not asyncio's words."""
    if isinstance(error, socket.gaierror) or not error.errno:
        return error.strerror or str(error)
    return os.strerror(error.errno)


def _tls_reason(exc: BaseException) -> str:
    error = getattr(exc, "certificate_error", None) or exc
    return describe_tls_error(error) or " ".join(str(error).split())


def _json(text: str) -> dict[str, Any]:
    try:
        answer = json.loads(text)
    except ValueError:
        return {"message": text.strip()}
    return answer if isinstance(answer, dict) else {"message": text.strip()}


def _header_int(headers: CIMultiDictProxy[str], name: str, default: int | None) -> int | None:
    value = headers.get(name)
    if value is None:
        return default
    if not value.strip().isdigit():
        raise UploadFailed(f"the server answered {name}: {value!r}, not a number", EXIT_REFUSED)
    return int(value)


def _file_state(stream: BinaryIO) -> tuple[int, int]:
    info = os.fstat(stream.fileno())
    return info.st_size, info.st_mtime_ns


def _size(n: int) -> str:
    """`512 B`, `3.5 MiB`, `1.19 GiB`."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{n} B"
    return f"{value:.2f}".rstrip("0").rstrip(".") + f" {unit}"
