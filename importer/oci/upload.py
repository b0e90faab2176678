"""A blob upload session whose data goes out as one streamed, chunked PATCH.

The registry ignores Content-Range and cannot resume after a failed request, so the data
goes in order through a single request, fed from a small bounded queue: when the registry
is slower than the writer, `write()` waits. The request runs as a background task from the
first `write()` to `finish()`; a failure of that task surfaces at the next `write()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from enum import Enum

import aiohttp
from yarl import URL

from importer.oci.authorizer import delete_scope, push_scope
from importer.oci.errors import RegistryError
from importer.oci.transport import Transport, with_query_param

QUEUE_ITEMS = 4
CANCEL_TIMEOUT = 10.0


class _State(Enum):
    OPEN = "open"
    CLOSING = "closing"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class BlobUpload:
    """Created by `RegistryClient.start_blob_upload`. Call `write()` from one task at a time
    and do not change a buffer after handing it over; end with `finish()` or `cancel()`."""

    def __init__(
        self, transport: Transport, repo: str, location: URL, *, queue_items: int = QUEUE_ITEMS
    ) -> None:
        self.repo = repo
        self.location = location
        self.offset = 0  # bytes handed to write() so far
        self._transport = transport
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(queue_items)
        self._patch: asyncio.Task[URL] | None = None
        self._body_ended = False  # the end-of-body mark is queued
        self._body_complete = False  # the request has sent it
        self._state = _State.OPEN
        self._what = f"pushing a blob to {repo}"

    async def write(self, data: bytes) -> None:
        if self._state is not _State.OPEN:
            raise RegistryError(f"{self._what}: the upload is already {self._state.value}")
        if not data:
            return
        if self._patch is None:
            self._patch = asyncio.create_task(self._send_patch())
        await self._enqueue(data)
        self.offset += len(data)

    async def finish(self, digest: str) -> None:
        """Ends the data, then commits the blob under `digest`; the registry checks it."""
        if self._state is not _State.OPEN:
            raise RegistryError(f"{self._what}: the upload is already {self._state.value}")
        self._state = _State.CLOSING
        try:
            location = self.location
            if self._patch is not None:
                await self._enqueue(None)
                self._body_ended = True
                location = await self._patch_result()
            what = f"finishing the blob upload to {self.repo} as {digest}"
            url = with_query_param(location, "digest", digest)
            async with self._transport.request(
                "PUT", url, what=what, scope=push_scope(self.repo), ok={201}
            ):
                pass
        except BaseException:
            await self._discard()
            raise
        self._state = _State.FINISHED

    async def cancel(self) -> None:
        """Stops the data and deletes the session on the registry; best effort, never raises."""
        if self._state in (_State.FINISHED, _State.CANCELLED):
            return
        await self._discard()

    async def _send_patch(self) -> URL:
        async with self._transport.request(
            "PATCH",
            self.location,
            what=self._what,
            scope=push_scope(self.repo),
            ok={202},
            headers={"Content-Type": "application/octet-stream"},
            data=self._body(),
            replayable=False,
        ) as response:
            if not self._body_complete:
                raise RegistryError(f"{self._what}: the registry answered before the data ended")
            return self._transport.location(response, self._what)

    async def _body(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk
        self._body_complete = True

    async def _enqueue(self, item: bytes | None) -> None:
        assert self._patch is not None
        patch = self._patch
        if patch.done():
            raise self._patch_failure()
        try:
            self._queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        waiter = asyncio.ensure_future(self._queue.put(item))
        try:
            done, _ = await asyncio.wait(
                (waiter, patch),
                timeout=self._transport.io_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not waiter.done():
                waiter.cancel()
        if waiter in done:
            return
        if patch.done():
            raise self._patch_failure()
        timeout = self._transport.io_timeout
        raise RegistryError(f"{self._what}: the registry took no data for {timeout:g} s")

    async def _patch_result(self) -> URL:
        assert self._patch is not None
        await asyncio.wait((self._patch,))
        if self._patch.cancelled() or self._patch.exception() is not None:
            raise self._patch_failure()
        return self._patch.result()

    def _patch_failure(self) -> RegistryError:
        assert self._patch is not None and self._patch.done()
        if self._patch.cancelled():
            return RegistryError(f"{self._what}: the upload was cancelled")
        exc = self._patch.exception()
        if isinstance(exc, RegistryError):
            return RegistryError(exc.message, status=exc.status, code=exc.code)
        if exc is None:
            return RegistryError(f"{self._what}: the registry ended the upload early")
        return RegistryError(f"{self._what}: {exc}")

    async def _discard(self) -> None:
        self._state = _State.CANCELLED
        location = await self._end_patch_for_cancel()
        try:
            async with self._transport.request(
                "DELETE",
                location,
                what=f"cancelling the blob upload to {self.repo}",
                scope=delete_scope(self.repo),
                ok={202, 204, 400, 404},
                timeout=aiohttp.ClientTimeout(total=CANCEL_TIMEOUT),
            ):
                pass
        except Exception:
            pass  # the registry's upload purging removes what is left, eventually

    async def _end_patch_for_cancel(self) -> URL:
        """The location to DELETE. The registry 2.8 only deletes a session whose `_state`
        carries the current offset, and only a completed PATCH answers with one: so the body
        is ended cleanly when possible, and the connection cut only when that fails."""
        patch = self._patch
        if patch is None:
            return self.location
        if not patch.done():
            try:
                async with asyncio.timeout(CANCEL_TIMEOUT):
                    if not self._body_ended:
                        await self._enqueue(None)
                    await asyncio.wait((patch,))
            except (RegistryError, TimeoutError):
                pass
            if not patch.done():
                patch.cancel()
                await asyncio.wait((patch,))
        if patch.cancelled() or patch.exception() is not None:
            return self.location
        return patch.result()
