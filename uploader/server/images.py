"""The life of an image: create, replace, delete, and the transfers that fill it.

Phases: Pending -> WaitForUserUpload (Upload only) -> Provisioning -> Ready, or Failed with
a reason. Every change goes through the store, so watchers see it and it survives a restart.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from importer.errors import ProvisioningFailed, Suspended, TransferError, TransferInterrupted
from importer.metrics import Metrics
from importer.pipeline import Checkpoint, PipelineOptions, Sink, TransferResult
from importer.progress import Progress, format_quantity
from importer.sources.reader import Reader
from importer.transfer import OpenedSource, SourceOpener, run_transfer
from uploader.errors import (
    AlreadyExists,
    ApiError,
    BadRequest,
    Conflict,
    Gone,
    Invalid,
    NotFound,
    SpecImmutable,
    TooManyImages,
)
from uploader.resources import Kind, ready_condition, validate_manifest
from uploader.server.config import ServerConfig
from uploader.server.data_sources import ImportPlan, SourceNotReady, SourcePlanner
from uploader.server.destinations import KeptOnStop, Storage, spill_files_of, uses_pvc
from uploader.server.image_db import Object, Store, key_of
from uploader.server.upload_feed import BodyEnd, Busy, OffsetMismatch, UploadFeed
from uploader.server.upload_tokens import ImageKey, TokenIndex, new_token, redact

log = logging.getLogger(__name__)

PENDING = "Pending"
WAIT_FOR_UPLOAD = "WaitForUserUpload"
PROVISIONING = "Provisioning"
READY = "Ready"
FAILED = "Failed"
TERMINATING = "Terminating"

# How often an import that waits for its source looks again.
SOURCE_POLL_INTERVAL = 0.5
# How long a stop waits for an upload to save its checkpoint.
SUSPEND_TIMEOUT = 10.0


def offset_headers(offset: int) -> dict[str, str]:
    return {"Upload-Offset": str(offset), "Tus-Resumable": "1.0.0"}


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass
class SavedUpload:
    """An upload's last checkpoint, from which it continues after a restart."""

    uid: str
    generation: int
    offset: int
    total: int | None
    filename: str | None
    hashes: dict[str, bytes]
    sink: bytes

    def record(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "generation": self.generation,
            "offset": self.offset,
            "total": self.total,
            "filename": self.filename,
            "hashes": {k: base64.b64encode(v).decode() for k, v in self.hashes.items()},
        }

    @classmethod
    def load(cls, record: dict[str, Any], sink: bytes) -> SavedUpload:
        hashes = {k: base64.b64decode(v) for k, v in record["hashes"].items()}
        return cls(
            record["uid"],
            record["generation"],
            record["offset"],
            record["total"],
            record["filename"],
            hashes,
            sink,
        )

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.offset, self.hashes, self.sink)


@dataclass
class UploadPart:
    """One request's part of an upload."""

    body: Reader
    start: int  # the offset of its first byte
    total: int | None  # the image's length, when the request says it
    whole: bool  # the whole image from byte 0 (no Content-Range, no Upload-Offset)
    wrong_offset: Callable[[int], ApiError]  # the answer to a part at the wrong offset
    filename: str | None = None


RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


class UploadTimedOut(TransferError):
    reason = "WaitForUserUploadTimeout"
    http_status = 408


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime(RFC3339)


def image_key(kind: Kind, namespace: str | None, name: str) -> ImageKey:
    return kind.name, namespace if kind.namespaced and namespace else "", name


@dataclass
class ActiveTransfer:
    """A transfer in progress for one image (one at a time per image)."""

    key: ImageKey
    uid: str
    generation: int
    progress: Progress
    task: asyncio.Task[Any] | None
    feed: UploadFeed | None = None  # an upload's bytes, across the requests that carry them
    saved_spills: frozenset[str] = frozenset()  # the spill files of its last checkpoint
    resumable: bool = False  # it saves checkpoints (an upload into PVC storage)
    cancelled_by: ApiError | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel(self, reason: ApiError) -> None:
        self.cancelled_by = reason
        if self.task is not None:
            self.task.cancel()


class ImageController:
    def __init__(self, config: ServerConfig, store: Store, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.storage = Storage(config)
        self.planner = SourcePlanner(config, store, self.storage)
        self.tokens = TokenIndex()
        self.ready_tokens = TokenIndex()
        # Upload URLs of failed images answer 410 with the failure, rather than 404.
        self.failed_tokens = TokenIndex()
        self.transfers: dict[ImageKey, ActiveTransfer] = {}
        self._imports: dict[ImageKey, asyncio.Task[None]] = {}
        # Images being read by an import; deleting one waits in Terminating until it is not.
        self._readers: collections.Counter[ImageKey] = collections.Counter()
        self._deferred_deletes: set[ImageKey] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._expirer: asyncio.Task[None] | None = None
        # Uploads cut by a restart that continue from their last checkpoint (PVC storage).
        self._resumable: dict[ImageKey, SavedUpload] = {}
        self._stopping = False
        self.external_base = ""
        self.in_cluster_base = ""

    # -- start and stop -----------------------------------------------------------------

    async def start(self, own_base_url: str) -> None:
        """Sets the upload URL bases and brings every stored image back to a steady state."""
        self.external_base = (self.config.external_url or own_base_url).rstrip("/")
        self.in_cluster_base = (self.config.in_cluster_url or own_base_url).rstrip("/")
        for obj in self.store.all():
            try:
                await self._recover(obj)
            except Exception as exc:
                # One image that cannot be brought back fails; the server and the others go on.
                log.exception("image %s could not be recovered", "/".join(key_of(obj)))
                self._fail_recovery(obj, exc)
        kept = [saved.sink for saved in self._resumable.values()]
        await asyncio.to_thread(self.storage.clean_spill_dir, kept)
        if self.config.wait_for_upload_timeout > 0:
            self._expirer = asyncio.create_task(self._expire_waiting_uploads())

    def _fail_recovery(self, obj: Object, error: Exception) -> None:
        key = key_of(obj)
        self._resumable.pop(key, None)
        if obj.get("status", {}).get("phase") == TERMINATING:
            self.tokens.remove(key)
            with contextlib.suppress(Exception):
                self.store.delete(key)  # its data may stay behind; the log says why
            return
        self._fail(
            obj,
            ProvisioningFailed(
                f"the server could not bring the image back after a restart: {error}"
            ),
        )
        with contextlib.suppress(Exception):
            self.store.save(obj)

    async def _expire_waiting_uploads(self) -> None:
        """Fails images that waited for their upload longer than the server allows."""
        timeout = self.config.wait_for_upload_timeout
        while True:
            await asyncio.sleep(min(30.0, max(timeout / 4, 0.2)))
            now = datetime.now(UTC)
            for obj in self.store.all():
                if obj["status"].get("phase") != WAIT_FOR_UPLOAD or key_of(obj) in self.transfers:
                    continue
                ready = ready_condition(obj["status"])
                assert ready is not None  # every phase change sets it
                since = datetime.strptime(ready["lastTransitionTime"], RFC3339).replace(tzinfo=UTC)
                if (now - since).total_seconds() >= timeout:
                    self._fail(
                        obj,
                        UploadTimedOut(
                            f"no upload arrived within {timeout:g} s; delete the image and "
                            "create it again to upload"
                        ),
                    )
                    with contextlib.suppress(ApiError):  # a full disk: tried again next round
                        self.store.save(obj)

    async def _recover(self, obj: Object) -> None:
        key = key_of(obj)
        status = obj.get("status", {})
        phase = status.get("phase")
        if phase == TERMINATING:
            await self.storage.remove_data(obj)
            self.store.delete(key)
        elif phase in (READY, FAILED):
            token = self._token_of(obj)
            if token:
                (self.ready_tokens if phase == READY else self.failed_tokens).add(token, key)
        elif phase in (PENDING, WAIT_FOR_UPLOAD, PROVISIONING):
            token = self._token_of(obj)
            saved = self._saved_upload(obj)
            if saved is None:
                # A transfer cut by a stop: its partial data is dropped, the image starts over.
                self.store.drop_checkpoint(key)
                await asyncio.to_thread(self.storage.remove_partial, obj)
            if obj["spec"]["dataSource"]["type"] == "Upload" and token:
                self.tokens.add(token, key)
                message = "Waiting for upload"
                self._clear_progress(obj)
                if saved is not None:
                    self._resumable[key] = saved
                    message = (
                        f"The server restarted; the upload continues at byte {saved.offset}: "
                        f"curl -C {saved.offset} -T FILE URL"
                    )
                    if saved.total:
                        obj["status"]["progress"] = f"{saved.offset / saved.total * 100:.1f}%"
                self._set_phase(obj, WAIT_FOR_UPLOAD, "WaitForUserUpload", message)
                self.store.save(obj)
            else:
                self._begin(obj)

    def _saved_upload(self, obj: Object) -> SavedUpload | None:
        """The image's checkpoint, if it is one of this very upload."""
        found = self.store.checkpoint(key_of(obj))
        if found is None:
            return None
        saved = SavedUpload.load(*found)
        meta = obj["metadata"]
        if (saved.uid, saved.generation) != (meta["uid"], meta.get("generation", 1)):
            return None
        return saved

    def _forget_saved_upload(self, obj: Object) -> None:
        key = key_of(obj)
        saved = self._resumable.pop(key, None)
        self.store.drop_checkpoint(key)
        self.storage.remove_partial(obj)
        if saved is not None:
            self.storage.drop_spill_files(spill_files_of(saved.sink))

    async def stop(self) -> None:
        """Cancels every transfer; their images stay as they are and resume on start."""
        self._stopping = True
        if self._expirer is not None:
            self._expirer.cancel()
        # Uploads into PVC storage save a checkpoint of all they took, then end.
        suspending = [t for t in self.transfers.values() if t.feed is not None and t.resumable]
        for transfer in suspending:
            assert transfer.feed is not None
            transfer.feed.suspend()
        for transfer in suspending:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(transfer.done.wait(), SUSPEND_TIMEOUT)
        for transfer in list(self.transfers.values()):
            transfer.cancel(Conflict("the server is shutting down; upload again"))
        for task in list(self._imports.values()):
            task.cancel()
        for transfer in list(self.transfers.values()):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(transfer.done.wait(), 30)
        tasks = [*self._imports.values(), *self._background]
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        await self.storage.close()

    # -- API ----------------------------------------------------------------------------

    def get(self, kind: Kind, namespace: str | None, name: str) -> Object:
        obj = self.store.get(image_key(kind, namespace, name))
        if obj is None:
            raise NotFound(f'{kind.display} "{name}" not found')
        return obj

    def list(self, kind: Kind, namespace: str | None) -> list[Object]:
        return self.store.list(kind.name, namespace if kind.namespaced else None)

    async def create(self, kind: Kind, namespace: str | None, doc: Any) -> Object:
        obj = validate_manifest(doc, kind, namespace)
        key = key_of(obj)
        if self.store.get(key) is not None:
            raise AlreadyExists(f'{kind.display} "{obj["metadata"]["name"]}" already exists')
        self._check_quota(kind, namespace)
        obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        obj["status"] = {"phase": PENDING}
        self._set_phase(obj, PENDING, PENDING, "Waiting for the data source")
        self._begin(obj)
        return self.store.get(key) or obj

    def _check_quota(self, kind: Kind, namespace: str | None) -> None:
        limit, total = self.config.max_images, self.store.count(kind.name)
        if kind.namespaced and namespace is not None:
            per_namespace = self.store.count(kind.name, namespace)
            if per_namespace >= self.config.max_images_per_namespace:
                raise TooManyImages(
                    f'exceeded quota: the namespace "{namespace}" has {per_namespace} '
                    f"{kind.plural}, the most this server allows per namespace "
                    "(--max-images-per-namespace); delete some first"
                )
        if total >= limit:
            raise TooManyImages(
                f"exceeded quota: the server holds {total} {kind.plural}, the most it allows "
                "(--max-images); delete some first"
            )

    async def replace(self, kind: Kind, namespace: str | None, name: str, doc: Any) -> Object:
        current = self.get(kind, namespace, name)
        new = validate_manifest(doc, kind, namespace)
        if new["metadata"]["name"] != name:
            raise Invalid(
                f'metadata.name: Invalid value: "{new["metadata"]["name"]}": '
                f'must be "{name}", the name in the URL'
            )
        phase = current["status"].get("phase")
        if new["spec"] == current["spec"]:
            current["metadata"].update(
                {k: v for k, v in new["metadata"].items() if k in ("labels", "annotations")}
            )
            return self.store.save(current)
        if phase in (READY, TERMINATING):
            raise SpecImmutable(
                f'{kind.display} "{name}" is {phase}: its spec cannot change any more; '
                "delete it and create it again"
            )
        key = key_of(current)
        await self._cancel_transfer(key, Conflict("the image's spec changed; upload again"))
        current = self.get(kind, namespace, name)
        self.tokens.remove(key)
        self.failed_tokens.remove(key)
        current["spec"] = new["spec"]
        for meta_key in ("labels", "annotations"):
            if meta_key in new["metadata"]:
                current["metadata"][meta_key] = new["metadata"][meta_key]
        current["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        current["status"] = {"phase": PENDING}
        self._set_phase(current, PENDING, PENDING, "The spec changed; starting over")
        self._begin(current)
        return self.get(kind, namespace, name)

    async def delete(self, kind: Kind, namespace: str | None, name: str) -> Object:
        obj = self.get(kind, namespace, name)
        key = key_of(obj)
        if key in self._deferred_deletes:
            return obj
        self.tokens.remove(key)
        self.ready_tokens.remove(key)
        self.failed_tokens.remove(key)
        if self._readers[key]:
            self._set_phase(
                obj,
                TERMINATING,
                TERMINATING,
                "The image is being deleted once the imports that read it end",
            )
            self._deferred_deletes.add(key)
            return self.store.save(obj, essential=True)
        self._set_phase(obj, TERMINATING, TERMINATING, "The image is being deleted")
        obj = self.store.save(obj, essential=True)
        await self._cancel_transfer(key, NotFound("the image was deleted during the upload"))
        await self._remove(obj)
        return obj

    async def _remove(self, obj: Object) -> None:
        try:
            await self.storage.remove_data(obj)
        except OSError as exc:
            # The record goes anyway: an image nobody can delete is worse than stray data.
            log.warning("the data of %s stays behind: %s", "/".join(key_of(obj)), exc)
        self.metrics.forget(obj["metadata"]["uid"])
        self.store.delete(key_of(obj))
        await asyncio.to_thread(self.store.keep_reserve)

    async def _cancel_transfer(self, key: ImageKey, reason: ApiError) -> None:
        transfer = self.transfers.get(key)
        if transfer is not None:
            transfer.cancel(reason)
            await transfer.done.wait()
        waiting = self._imports.get(key)
        if waiting is not None and waiting is not asyncio.current_task():
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiting

    @contextlib.contextmanager
    def _reading(self, key: ImageKey | None) -> Any:
        """Marks the image `key` as read by an import, for the time of the block."""
        if key is None:
            yield
            return
        self._readers[key] += 1
        try:
            yield
        finally:
            self._readers[key] -= 1
            if not self._readers[key]:
                del self._readers[key]
                if key in self._deferred_deletes:
                    self._deferred_deletes.discard(key)
                    task = asyncio.create_task(self._finish_deferred_delete(key))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    async def _finish_deferred_delete(self, key: ImageKey) -> None:
        obj = self.store.get(key)
        if obj is not None:
            await self._remove(obj)

    # -- starting an image ----------------------------------------------------------------

    def _begin(self, obj: Object) -> None:
        """Moves a new (or restarted) image out of Pending according to its data source."""
        key = key_of(obj)
        source_type = obj["spec"]["dataSource"]["type"]
        obj["status"]["target"] = self.storage.target_status(obj)
        if source_type == "Upload":
            token = new_token()
            obj["status"]["imageUploadURLs"] = {
                "external": f"{self.external_base}/upload/{token}",
                "inCluster": f"{self.in_cluster_base}/upload/{token}",
            }
            self.tokens.add(token, key)
            self._set_phase(obj, WAIT_FOR_UPLOAD, "WaitForUserUpload", "Waiting for upload")
            log.info("image %s waits for upload, token %s", "/".join(key), redact(token))
        obj["status"]["observedGeneration"] = obj["metadata"].get("generation", 1)
        obj = self.store.save(obj)
        if source_type != "Upload":
            self._start_import(obj)

    @staticmethod
    def _token_of(obj: Object) -> str | None:
        url = obj.get("status", {}).get("imageUploadURLs", {}).get("external")
        return url.rsplit("/", 1)[-1] if url else None

    # -- uploads --------------------------------------------------------------------------

    def find_upload(self, token: str) -> Object:
        """The image a token uploads to; raises 404 for unknown or expired tokens, 409 for
        an image that is already Ready and 410, naming the failure, for a Failed one."""
        key = self.tokens.find(token)
        if key is None:
            ready = self.ready_tokens.find(token)
            if ready is not None:
                raise Conflict(
                    f"the image {ready[2]} is already Ready; it cannot be uploaded again"
                )
            failed_key = self.failed_tokens.find(token)
            failed = self.store.get(failed_key) if failed_key is not None else None
            # A replaced spec gives the image a new token: the old one is merely unknown.
            if failed is not None and self._token_of(failed) == token:
                why = ready_condition(failed["status"])
                if failed["status"].get("phase") == FAILED and why is not None:
                    raise Gone(why["message"], why["reason"])
            raise NotFound("no image waits for an upload at this URL (wrong or expired token)")
        obj = self.store.get(key)
        if obj is None:
            raise NotFound("no image waits for an upload at this URL (wrong or expired token)")
        return obj

    def upload_offset(self, key: ImageKey) -> int:
        """The bytes of the image taken so far, where an upload continues."""
        transfer = self.transfers.get(key)
        if transfer is not None and transfer.feed is not None:
            return transfer.feed.offset
        saved = self._resumable.get(key)
        return saved.offset if saved is not None else 0

    def check_part(self, token: str, part: UploadPart) -> Object:
        """Refuses, before its body is sent, a part that cannot be taken now."""
        obj = self.find_upload(token)
        transfer = self.transfers.get(key_of(obj))
        feed = transfer.feed if transfer is not None else None
        if feed is not None and feed.attached is not None and not feed.attached.stalled:
            raise Conflict(
                "another upload to this image is in progress",
                headers=offset_headers(feed.offset),
            )
        offset = self.upload_offset(key_of(obj))
        if not part.whole and part.start != offset:
            raise part.wrong_offset(offset)
        saved = self._resumable.get(key_of(obj))
        known = feed.total if feed is not None else saved.total if saved is not None else None
        if not part.whole and None not in (part.total, known) and part.total != known:
            raise BadRequest(
                f"this upload is {known} bytes long; the request says {part.total} "
                "(Upload-Length or the Content-Range total)"
            )
        return obj

    def transfer_of(self, key: ImageKey) -> ActiveTransfer | None:
        return self.transfers.get(key)

    async def receive(self, token: str, part: UploadPart) -> tuple[BodyEnd, Object | None]:
        """Takes one request's part of an upload. Returns how its body ended and, when the
        image is complete, the image (Ready; errors are raised)."""
        obj = self.check_part(token, part)
        key = key_of(obj)
        transfer = self.transfers.get(key)
        if transfer is not None and (transfer.feed is None or part.whole):
            # A whole-image request starts over what an earlier one left parked.
            await self._cancel_transfer(key, Conflict("the upload started over from byte 0"))
            transfer = None
        if transfer is None:
            saved = self._resumable.get(key)
            if saved is not None and part.whole:
                await asyncio.to_thread(self._forget_saved_upload, obj)
                saved = None
            start = saved.offset if saved is not None else 0
            if part.start != start:
                raise part.wrong_offset(start)
            transfer = self._start_upload(obj, part, saved)
        assert transfer.feed is not None and transfer.task is not None
        try:
            body = await transfer.feed.attach(part.body, part.start, part.total, part.whole)
        except Busy:
            raise Conflict(
                "another upload to this image is in progress",
                headers=offset_headers(transfer.feed.offset),
            ) from None
        except OffsetMismatch as exc:
            raise part.wrong_offset(exc.offset) from None
        await asyncio.wait({body.end, transfer.task}, return_when=asyncio.FIRST_COMPLETED)
        how = body.end.result() if body.end.done() else BodyEnd.STOPPED
        if how in (BodyEnd.COMPLETE, BodyEnd.STOPPED) or transfer.task.done():
            return BodyEnd.COMPLETE, await asyncio.shield(transfer.task)
        return how, None

    def _start_upload(
        self, obj: Object, part: UploadPart, saved: SavedUpload | None = None
    ) -> ActiveTransfer:
        transfer = self._new_transfer(obj)
        feed = UploadFeed(
            saved.total if saved is not None else part.total,
            self.config.upload_grace,
            self.config.upload_idle_timeout,
            on_park=lambda how: self._on_park(transfer, how),
            offset=saved.offset if saved is not None else 0,
        )
        transfer.feed = feed
        transfer.saved_spills = spill_files_of(saved.sink) if saved is not None else frozenset()
        filename = saved.filename if saved is not None else part.filename
        start = feed.offset
        self._resumable.pop(transfer.key, None)

        @contextlib.asynccontextmanager
        async def body() -> AsyncIterator[OpenedSource]:
            try:
                yield OpenedSource(feed, feed.total, filename, offset=start)
            finally:
                feed.close()

        task = asyncio.create_task(self._run_transfer(transfer, obj, body, saved))
        task.add_done_callback(_retrieve)  # the outcome is in the status, if nobody asks
        transfer.task = task
        return transfer

    # -- imports --------------------------------------------------------------------------

    def _start_import(self, obj: Object) -> None:
        key = key_of(obj)
        task = asyncio.create_task(self._run_import(obj))
        self._imports[key] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._imports.get(key) is done:
                del self._imports[key]

        task.add_done_callback(forget)

    async def _run_import(self, obj: Object) -> None:
        try:
            plan = await self._wait_for_source(obj)
        except TransferError as exc:
            current = self.store.get(key_of(obj))
            if current is not None and current["metadata"]["uid"] == obj["metadata"]["uid"]:
                self._fail(current, exc)
                self.store.save(current)
            return
        try:
            # The outcome is in the image's status; nobody waits for this task.
            with self._reading(plan.source_image), contextlib.suppress(TransferError, ApiError):
                if plan.copy_from is not None:
                    await self._run_copy(obj, plan)
                else:
                    assert plan.open_source is not None
                    await self._run_transfer(self._new_transfer(obj), obj, plan.open_source)
        finally:
            plan.release()

    async def _wait_for_source(self, obj: Object) -> ImportPlan:
        """Plans the import, waiting in Pending (and saying why) while the source is not
        ready to be read."""
        shown = None
        while True:
            try:
                return await self.planner.plan(obj)
            except SourceNotReady as waiting:
                if waiting.message != shown:
                    shown = waiting.message
                    current = self.store.get(key_of(obj)) or obj
                    self._set_phase(current, PENDING, "ProvisioningNotStarted", waiting.message)
                    obj = self.store.save(current)
                await asyncio.sleep(SOURCE_POLL_INTERVAL)

    async def _run_copy(self, obj: Object, plan: ImportPlan) -> None:
        """One DVCR image into another without moving bytes: the new tag shares the blobs."""
        assert plan.copy_from is not None
        repo, tag = plan.copy_from
        self._set_phase(obj, PROVISIONING, PROVISIONING, "Copying the image within DVCR")
        obj = self.store.save(obj)
        uid, generation = obj["metadata"]["uid"], obj["metadata"].get("generation", 1)
        try:
            await self.storage.copy_image(repo, tag, obj)
        except TransferError as exc:
            self._fail(obj, exc)
            self.store.save(obj)
            raise
        current = self.store.get(key_of(obj))
        if current is None or current["metadata"]["uid"] != uid:
            await self.storage.remove_data(obj)  # deleted meanwhile
            return
        if current["metadata"].get("generation", 1) != generation:
            return  # the spec changed meanwhile; its own import fills the image
        obj = current
        source = plan.source_status
        obj["status"].update(
            progress="100%",
            **{k: source[k] for k in ("size", "format", "cdrom", "checksum") if k in source},
        )
        self._set_phase(obj, READY, READY, "The image is ready")
        log.info("image %s is Ready: copied from %s:%s", "/".join(key_of(obj)), repo, tag)
        self.store.save(obj)

    # -- the transfer ---------------------------------------------------------------------

    def _on_park(self, transfer: ActiveTransfer, how: BodyEnd | None) -> None:
        """An upload waits for its next part (`how` its last one ended), or continues."""
        obj = self._current(transfer)
        if obj is None or transfer.feed is None:
            return
        offset = transfer.feed.offset
        if how is None:
            self._set_phase(
                obj, PROVISIONING, PROVISIONING, f"Receiving the image from byte {offset}"
            )
        else:
            total = transfer.feed.total
            of_total = f" of {total}" if total is not None else ""
            self._set_phase(
                obj,
                WAIT_FOR_UPLOAD,
                "WaitForUserUpload",
                f"The upload stopped at byte {offset}{of_total} ({how.value}); continue it "
                "from there: HEAD the upload URL for Upload-Offset, then "
                "curl -C OFFSET -T FILE URL",
            )
        self.store.save(obj, durable=False)

    def _new_transfer(self, obj: Object) -> ActiveTransfer:
        transfer = ActiveTransfer(
            key_of(obj),
            obj["metadata"]["uid"],
            obj["metadata"].get("generation", 1),
            Progress(),
            None,
        )
        self.transfers[transfer.key] = transfer
        return transfer

    async def _run_transfer(
        self,
        transfer: ActiveTransfer,
        obj: Object,
        open_source: SourceOpener,
        saved: SavedUpload | None = None,
    ) -> Object:
        """Runs one transfer into the image and records its outcome in the status."""
        key = transfer.key
        progress = transfer.progress
        transfer.task = asyncio.current_task()
        # Uploads into PVC storage save checkpoints, and keep their data over a stop.
        transfer.resumable = (
            transfer.feed is not None and uses_pvc(obj) and bool(self.config.checkpoint_every)
        )
        self.metrics.active_transfers.inc()
        reporter = asyncio.create_task(self._report_progress(transfer))

        async def open_sink(source: OpenedSource) -> Sink:
            if saved is not None:
                sink = await self.storage.resume_sink(obj, saved.sink)
            else:
                sink = await self.storage.open_sink(obj, source.length, source.filename)
            if not transfer.resumable:
                return sink
            return KeptOnStop(sink, lambda: self._stopping, lambda: self._drop_checkpoint(transfer))

        def options_for(source: OpenedSource) -> PipelineOptions:
            options = self._pipeline_options(obj, source.length)
            if transfer.resumable:
                options.checkpoint_every = self.config.checkpoint_every
                options.on_checkpoint = functools.partial(self._save_checkpoint, transfer, source)
            if saved is not None:
                options.resume_from = saved.checkpoint()
            return options

        try:
            self._set_phase(obj, PROVISIONING, PROVISIONING, "Receiving the image")
            self.store.save(obj)
            result = await run_transfer(open_source, open_sink, options_for, progress)
            self.metrics.received_bytes.inc(result.received_bytes)
            self.metrics.written_bytes.inc(result.written_bytes)
        except asyncio.CancelledError:
            self.metrics.transfers.labels("cancelled").inc()
            if transfer.cancelled_by is None:
                raise
            raise transfer.cancelled_by from None
        except Suspended:
            self.metrics.transfers.labels("suspended").inc()
            raise  # the image stays as it is; after the restart it continues
        except TransferInterrupted:
            self.metrics.transfers.labels("interrupted").inc()
            self._after_interrupt(transfer)
            raise
        except TransferError as exc:
            self.metrics.transfers.labels("failed").inc()
            self._after_failure(transfer, exc)
            raise
        except Exception as exc:
            self.metrics.transfers.labels("failed").inc()
            log.exception("transfer into %s failed", "/".join(key))
            self._after_failure(transfer, TransferError(f"internal error: {exc}"))
            raise
        finally:
            reporter.cancel()
            self.transfers.pop(key, None)
            self.metrics.active_transfers.dec()
            if not self._stopping:
                self._drop_checkpoint(transfer)  # kept only for a restart to continue from
            transfer.done.set()
        self.metrics.transfers.labels("succeeded").inc()
        return self._after_success(transfer, result)

    async def _save_checkpoint(
        self, transfer: ActiveTransfer, source: OpenedSource, checkpoint: Checkpoint
    ) -> None:
        if checkpoint.sink is None or transfer.feed is None:
            return  # this stream cannot be continued after a restart (see importer/formats)
        saved = SavedUpload(
            transfer.uid,
            transfer.generation,
            checkpoint.offset,
            transfer.feed.total,
            source.filename,
            checkpoint.hashes,
            checkpoint.sink,
        )
        self.store.save_checkpoint(transfer.key, saved.record(), saved.sink)
        spills = spill_files_of(saved.sink)
        previous, transfer.saved_spills = transfer.saved_spills, spills
        self.storage.drop_spill_files(previous - spills)
        log.info("upload into %s: checkpoint at byte %d", "/".join(transfer.key), saved.offset)

    def _drop_checkpoint(self, transfer: ActiveTransfer) -> None:
        """Before the image is committed or when its transfer ends: nothing to continue."""
        self.store.drop_checkpoint(transfer.key)
        self.storage.drop_spill_files(transfer.saved_spills)
        transfer.saved_spills = frozenset()

    def _pipeline_options(self, obj: Object, expected_length: int | None) -> PipelineOptions:
        source = obj["spec"]["dataSource"]
        field_name = {"Upload": "upload", "HTTP": "http"}.get(source["type"], "none")
        expected = dict((source.get(field_name) or {}).get("checksum") or {})
        algorithms = list(self.config.checksums)
        for algorithm in ("sha256", "md5"):
            if algorithm in expected and algorithm not in algorithms:
                algorithms.append(algorithm)
        return PipelineOptions(
            algorithms=tuple(algorithms),
            expected_checksums=expected,
            expected_length=expected_length,
            max_received_bytes=self.config.max_image_size,
        )

    def _current(self, transfer: ActiveTransfer) -> Object | None:
        """The image, if it is still the one (same uid and generation) the transfer fills."""
        obj = self.store.get(transfer.key)
        if obj is None or obj["metadata"]["uid"] != transfer.uid:
            return None
        if obj["metadata"].get("generation", 1) != transfer.generation:
            return None
        return obj

    async def _report_progress(self, transfer: ActiveTransfer) -> None:
        last = None
        while True:
            await asyncio.sleep(self.config.status_interval)
            self.metrics.report(transfer.uid, transfer.progress)
            obj = self._current(transfer)
            if obj is None:
                return
            status = obj["status"]
            shown = (transfer.progress.percent(), transfer.progress.done)
            if shown == last:
                continue
            last = shown
            status["progress"] = transfer.progress.percent()
            status["downloadSpeed"] = transfer.progress.speed_status()
            self.store.save(obj, durable=False)

    def _after_success(self, transfer: ActiveTransfer, result: TransferResult) -> Object:
        obj = self._current(transfer)
        if obj is None:
            raise NotFound("the image was deleted or changed during the upload")
        key = transfer.key
        self.metrics.report(transfer.uid, transfer.progress)
        self.metrics.progress.labels(transfer.uid).set(100)
        status = obj["status"]
        info = result.image
        status.update(
            progress="100%",
            downloadSpeed=transfer.progress.speed_status(),
            size={
                "stored": format_quantity(result.stored_bytes),
                "storedBytes": str(result.stored_bytes),
                "unpacked": format_quantity(info.virtual_size),
                "unpackedBytes": str(info.virtual_size),
            },
            format=info.format,
            cdrom=info.cdrom,
            checksum=result.checksums,
        )
        self.store.set_received(key, result.received_bytes)
        token = self._token_of(obj)
        self.tokens.remove(key)
        if token:
            self.ready_tokens.add(token, key)
        self._set_phase(obj, READY, READY, "The image is ready")
        log.info(
            "image %s is Ready: %d bytes received, %s, virtual size %d",
            "/".join(key),
            result.received_bytes,
            info.format,
            info.virtual_size,
        )
        return self.store.save(obj)

    def _after_interrupt(self, transfer: ActiveTransfer) -> None:
        obj = self._current(transfer)
        if obj is None:
            return
        self._set_phase(
            obj,
            WAIT_FOR_UPLOAD,
            "WaitForUserUpload",
            "The last upload was interrupted; upload the image again",
        )
        self._clear_progress(obj)
        self.store.save(obj)

    def _after_failure(self, transfer: ActiveTransfer, error: TransferError) -> None:
        obj = self._current(transfer)
        if obj is None:
            return
        self._fail(obj, error)
        self.store.save(obj)

    def _fail(self, obj: Object, error: TransferError) -> None:
        key = key_of(obj)
        self.tokens.remove(key)
        token = self._token_of(obj)
        if token:
            self.failed_tokens.add(token, key)
        log.info("image %s failed: %s: %s", "/".join(key), error.reason, error.message)
        self._set_phase(obj, FAILED, error.reason, error.message)

    # -- status helpers -------------------------------------------------------------------

    @staticmethod
    def _clear_progress(obj: Object) -> None:
        for name in ("progress", "downloadSpeed"):
            obj["status"].pop(name, None)

    @staticmethod
    def _set_phase(obj: Object, phase: str, reason: str, message: str) -> None:
        status = obj.setdefault("status", {})
        status["phase"] = phase
        ready = "True" if phase == READY else "False"
        current = ready_condition(status)
        if current is None:
            current = {"type": "Ready"}
            status.setdefault("conditions", []).append(current)
        if current.get("status") != ready or current.get("reason") != reason:
            current["lastTransitionTime"] = now_rfc3339()
        current.update(status=ready, reason=reason, message=message)
        status["observedGeneration"] = obj["metadata"].get("generation", 1)
