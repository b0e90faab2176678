"""Upload sessions: what the upload URLs ask of the server, without HTTP.

An upload is one transfer fed by one request after another (uploader/server/upload_feed.py).
Each request's part is first *admitted* (before its body is sent: the token, the offset,
the lengths), then *received* (its body attached to the upload's feed at the offset where
the last one stopped). A tus creation request (`create`) only declares the upload's
length, or that it comes later. `state` is what `HEAD` and `GET` report. Errors are the
typed API errors of uploader/errors.py; those that tell a client where to continue carry
the offset, which the HTTP layer (uploader/server/upload_api.py) turns into headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from importer.errors import ImageTooLarge
from importer.sources.opened import OpenedSource
from importer.sources.reader import Reader
from uploader.errors import ApiError, BadRequest, Conflict, Gone, NotFound
from uploader.server.checkpoints import Checkpoints, SavedUpload
from uploader.server.config import ServerConfig
from uploader.server.destinations import LengthRequired, Storage
from uploader.server.image_model import FAILED, PROVISIONING, READY, Image
from uploader.server.image_states import ImageStates
from uploader.server.transfers import ActiveTransfer, Transfers
from uploader.server.upload_feed import BodyEnd, Busy, OffsetMismatch, UploadFeed
from uploader.server.upload_tokens import ImageKey, UploadTokens

log = logging.getLogger(__name__)

NO_UPLOAD_HERE = "no image waits for an upload at this URL (wrong or expired token)"


@dataclass
class UploadPart:
    """One request's part of an upload."""

    body: Reader
    start: int  # the offset of its first byte
    total: int | None  # the image's length, when the request says it
    whole: bool  # the whole image from byte 0 (no Content-Range, no Upload-Offset)
    wrong_offset: Callable[[int], ApiError]  # the answer to a part at the wrong offset
    filename: str | None = None
    length: int | None = None  # the length of its body, when the request says it
    ends_at_total: bool = False  # a tus PATCH: the upload ends when its length is reached
    deferred: bool = False  # the request says the length comes later (Upload-Defer-Length)

    def check_fits(self, total: int | None) -> None:
        """Refuses a body that would go past the end of an image of `total` bytes."""
        if total is None:
            return
        if self.start > total:
            raise BadRequest(
                f"the upload continues at byte {self.start}, past the end of the image"
            )
        if self.length is not None and self.length > total - self.start:
            raise BadRequest(
                f"the body of {self.length} bytes from byte {self.start} goes past the end of "
                f"the image, which is {total} bytes long"
            )


@dataclass
class UploadState:
    """What an upload URL reports: the phase, the bytes taken, and once Ready, what the
    image holds (a client compares its file with it)."""

    phase: str | None
    offset: int
    length: int | None
    progress: str
    format: str | None = None
    checksum: dict[str, str] | None = None

    def to_json(self) -> dict[str, object]:
        state: dict[str, object] = {
            "phase": self.phase,
            "offset": self.offset,
            "progress": self.progress,
        }
        if self.phase == READY:
            state["format"] = self.format
            state["checksum"] = self.checksum
        return state


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class UploadSessions:
    def __init__(
        self,
        config: ServerConfig,
        states: ImageStates,
        tokens: UploadTokens,
        storage: Storage,
        transfers: Transfers,
        checkpoints: Checkpoints,
    ) -> None:
        self.config = config
        self.states = states
        self.tokens = tokens
        self.storage = storage
        self.transfers = transfers
        self.checkpoints = checkpoints

    @property
    def max_image_size(self) -> int:
        return self.config.max_image_size

    def find(self, token: str) -> Image:
        """The image a token uploads to; NotFound for an unknown or expired token,
        Conflict for an image that is already Ready, Gone (with the failure's reason and
        message) for a Failed one."""
        key = self.tokens.waiting.find(token)
        if key is None:
            ready = self.tokens.ready.find(token)
            if ready is not None:
                raise Conflict(
                    f"the image {ready[2]} is already Ready; it cannot be uploaded again"
                )
            failed_key = self.tokens.failed.find(token)
            failed = self.states.get(failed_key) if failed_key is not None else None
            # A replaced spec gives the image a new token: the old one is merely unknown.
            if failed is not None and failed.upload_token == token:
                why = failed.ready_condition()
                if failed.phase == FAILED and why is not None:
                    raise Gone(why["message"], why["reason"])
            raise NotFound(NO_UPLOAD_HERE)
        image = self.states.get(key)
        if image is None:
            raise NotFound(NO_UPLOAD_HERE)
        return image

    def lookup(self, token: str) -> Image:
        """For requests that only look: a Ready image's token still answers."""
        key = self.tokens.waiting.find(token) or self.tokens.ready.find(token)
        image = self.states.get(key) if key else None
        if image is None:
            self.find(token)  # Gone for the token of a failed image
            raise NotFound(NO_UPLOAD_HERE)
        return image

    def offset(self, key: ImageKey) -> int:
        """The bytes of the image taken so far, where an upload continues."""
        transfer = self.transfers.get(key)
        if transfer is not None and transfer.feed is not None:
            return transfer.feed.offset
        saved = self.checkpoints.kept(key)
        return saved.offset if saved is not None else 0

    def delivering(self, key: ImageKey) -> int | None:
        """Where the upload stands while another request is delivering it (one that
        stalled does not count: a newer request takes over from it); None when none is."""
        transfer = self.transfers.get(key)
        feed = transfer.feed if transfer is not None else None
        if feed is None or feed.attached is None or feed.attached.stalled:
            return None
        return feed.offset

    def _transfer_total(self, key: ImageKey) -> int | None:
        """The length the upload's transfer (or its checkpoint) knows."""
        transfer = self.transfers.get(key)
        if transfer is not None and transfer.feed is not None:
            return transfer.feed.total
        saved = self.checkpoints.kept(key)
        return saved.total if saved is not None else None

    def _known_total(self, key: ImageKey) -> int | None:
        """The upload's length as far as anything declared it."""
        total = self._transfer_total(key)
        return total if total is not None else self.tokens.declared(key)

    def _started(self, key: ImageKey) -> bool:
        return self.transfers.get(key) is not None or self.offset(key) > 0

    def state(self, image: Image) -> UploadState:
        key = image.key
        state = UploadState(
            image.phase,
            self.offset(key),
            self._known_total(key),
            str(image.status.get("progress", "")),
        )
        if image.phase == READY:
            state.offset = state.length = self.states.store.received(key)
            state.format = image.status.get("format")
            state.checksum = image.status.get("checksum")
        return state

    def check_size(self, part: UploadPart) -> None:
        """Refuses a body or an image (as the request declares it) larger than the server
        takes."""
        limit = self.config.max_image_size
        if part.length is not None and part.length > limit:
            raise ImageTooLarge(
                f"the upload of {part.length} bytes exceeds the limit of {limit} bytes"
            )
        if part.total is not None and part.total > limit:
            raise ImageTooLarge(
                f"the image of {part.total} bytes (Upload-Length or the Content-Range total) "
                f"exceeds the limit of {limit} bytes"
            )

    def _check_part(self, image: Image, part: UploadPart) -> Image:
        """Refuses, before its body is sent, a part of the upload to `image` that cannot be
        taken now."""
        key = image.key
        busy_at = self.delivering(key)
        if busy_at is not None:
            raise Conflict("another upload to this image is in progress", offset=busy_at)
        offset = self.offset(key)
        if not part.whole and part.start != offset:
            raise part.wrong_offset(offset)
        known = self._known_total(key)
        if part.total is None and not part.whole:
            part.total = self.tokens.declared(key)  # the feed learns it with this part
        if not part.whole and None not in (part.total, known) and part.total != known:
            raise BadRequest(
                f"this upload is {known} bytes long; the request says {part.total} "
                "(Upload-Length or the Content-Range total)"
            )
        return image

    def admit(self, token: str, part: UploadPart) -> Image:
        """Checks a part before its body is read, in the order of the answers: the token,
        the sizes, its offset (the answer says where to continue), that its lengths agree
        with the upload's, then that the image's length is known where it must be:
        ContainerRegistry storage writes it before the first byte, and a tus upload ends
        when it is reached."""
        image = self.find(token)
        self.check_size(part)
        self._check_part(image, part)
        known = part.total
        if known is None and not part.whole:
            known = self._known_total(image.key)
            part.check_fits(known)
        self.storage.check_length(image.manifest, known)
        if part.ends_at_total and known is None and not self._deferred(image.key, part):
            raise BadRequest(
                "a tus PATCH needs the upload's length: create the upload first (POST to "
                "the upload URL with Upload-Length, or Upload-Defer-Length: 1 and "
                "Upload-Length with the last PATCH; tus-js-client: endpoint: URL), or send "
                "Upload-Length with the first PATCH (tuspy: TusClient(url, "
                "headers={'Upload-Length': str(size)}))"
            )
        return image

    def _deferred(self, key: ImageKey, part: UploadPart) -> bool:
        """Whether the upload's length comes with a later part, as its creation request or
        this part says."""
        return part.deferred or self.tokens.deferred(key)

    def create(self, token: str, length: int | None) -> tuple[Image, int]:
        """tus creation: declares the upload's length (None: it comes with a later part)
        without taking a byte. The URL stays the image's; an upload that already took bytes
        keeps them, and a length that contradicts what it already knows is refused. Returns
        the image and the offset where the upload continues."""
        image = self.find(token)
        key = image.key
        offset = self.offset(key)
        started = self._started(key)
        if length is None:
            # An upload that took nothing yet starts afresh, with its length to come.
            stays = self._known_total(key) if started else self._transfer_total(key)
            try:
                self.storage.check_length(image.manifest, stays)
            except LengthRequired:
                raise LengthRequired(
                    "ContainerRegistry storage needs the image's length before its data: "
                    "create the upload with Upload-Length, not Upload-Defer-Length "
                    "(tus-js-client: without uploadLengthDeferred)"
                ) from None
        else:
            limit = self.config.max_image_size
            if length > limit:
                raise ImageTooLarge(
                    f"the image of {length} bytes (Upload-Length) exceeds the limit of "
                    f"{limit} bytes"
                )
            if length == 0:
                raise BadRequest("Upload-Length is 0: an image has at least one byte")
            known = self._transfer_total(key)
            if known is None and started:
                known = self.tokens.declared(key)
            if known is not None and known != length:
                raise BadRequest(
                    f"this upload is {known} bytes long; the creation request says {length}",
                    offset=offset,
                )
            if length < offset:
                raise BadRequest(
                    f"this upload already took {offset} bytes, more than the {length} of "
                    "the creation request",
                    offset=offset,
                )
        if self._transfer_total(key) is None and (length is not None or not started):
            self.tokens.declare(key, length)
        return image, offset

    async def receive(self, token: str, part: UploadPart) -> tuple[BodyEnd, Image | None]:
        """Takes one request's part of an upload. Returns how its body ended and, when the
        image is complete, the image (Ready; errors are raised)."""
        image = self._check_part(self.find(token), part)
        key = image.key
        if part.whole:
            self.tokens.undeclare(key)  # a whole image brings its own length
        transfer = self.transfers.get(key)
        if transfer is not None and (transfer.feed is None or part.whole):
            # A whole-image request starts over what an earlier one left parked.
            await self.transfers.cancel(key, Conflict("the upload started over from byte 0"))
            transfer = None
        if transfer is None:
            saved = self.checkpoints.kept(key)
            if saved is not None and part.whole:
                await asyncio.to_thread(self.checkpoints.forget, image)
                saved = None
            start = saved.offset if saved is not None else 0
            if part.start != start:
                raise part.wrong_offset(start)
            transfer = self._start(image, part, saved)
        assert transfer.feed is not None and transfer.task is not None
        try:
            body = await transfer.feed.attach(part.body, part.start, part.total, part.whole)
        except Busy:
            raise Conflict(
                "another upload to this image is in progress", offset=transfer.feed.offset
            ) from None
        except OffsetMismatch as exc:
            raise part.wrong_offset(exc.offset) from None
        await asyncio.wait({body.end, transfer.task}, return_when=asyncio.FIRST_COMPLETED)
        how = body.end.result() if body.end.done() else BodyEnd.STOPPED
        if how in (BodyEnd.COMPLETE, BodyEnd.STOPPED) or transfer.task.done():
            self.tokens.undeclare(key)
            return BodyEnd.COMPLETE, await asyncio.shield(transfer.task)
        return how, None

    def received(self, image: Image) -> int:
        """The bytes a complete upload took."""
        return self.states.store.received(image.key)

    def _start(self, image: Image, part: UploadPart, saved: SavedUpload | None) -> ActiveTransfer:
        transfer = self.transfers.new(image)
        feed = UploadFeed(
            saved.total if saved is not None else part.total,
            self.config.upload_grace,
            self.config.upload_idle_timeout,
            on_park=lambda how: self._on_park(transfer, how),
            offset=saved.offset if saved is not None else 0,
        )
        transfer.feed = feed
        transfer.saved_spills = saved.spill_files if saved is not None else frozenset()
        filename = saved.filename if saved is not None else part.filename
        start = feed.offset
        self.checkpoints.take(transfer.key)

        @contextlib.asynccontextmanager
        async def body() -> AsyncIterator[OpenedSource]:
            try:
                yield OpenedSource(feed, feed.total, filename, offset=start)
            finally:
                feed.close()

        task = asyncio.create_task(self.transfers.run(transfer, image, body, saved))
        task.add_done_callback(_retrieve)  # the outcome is in the status, if nobody asks
        transfer.task = task
        return transfer

    def _on_park(self, transfer: ActiveTransfer, how: BodyEnd | None) -> None:
        """An upload waits for its next part (`how` its last one ended), or continues."""
        image = self.transfers.current(transfer)
        if image is None or transfer.feed is None:
            return
        offset = transfer.feed.offset
        if how is None:
            image.set_phase(PROVISIONING, PROVISIONING, f"Receiving the image from byte {offset}")
        else:
            total = transfer.feed.total
            of_total = f" of {total}" if total is not None else ""
            self.states.wait_for_upload(
                image,
                f"The upload stopped at byte {offset}{of_total} ({how.value}); continue it "
                "from there: HEAD the upload URL for Upload-Offset, then "
                "curl -C OFFSET -T FILE URL",
            )
        self.states.save(image, durable=False)
