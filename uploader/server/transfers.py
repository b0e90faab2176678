"""The transfers that fill images, one at a time per image: running one, its progress in
the status and the metrics, and its outcome (Ready, Failed, or waiting again for an upload).

An upload and an import run the same way (importer/transfer.py); what differs comes in:
the source (an upload's feed, or an opened import source) and, for an upload into PVC
storage, the checkpoint it continues from and saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from importer.errors import Suspended, TransferError, TransferInterrupted
from importer.metrics import Metrics
from importer.pipeline import Checkpoint, PipelineOptions, Sink, TransferResult
from importer.progress import Progress, format_quantity
from importer.sources.opened import OpenedSource, SourceOpener
from importer.transfer import run_transfer
from uploader.errors import ApiError, Conflict, NotFound
from uploader.server.checkpoints import Checkpoints, SavedUpload
from uploader.server.config import ServerConfig
from uploader.server.destinations import KeptOnStop, Storage, uses_pvc
from uploader.server.image_model import PROVISIONING, Image, shown
from uploader.server.image_states import ImageStates
from uploader.server.upload_feed import UploadFeed
from uploader.server.upload_tokens import ImageKey

log = logging.getLogger(__name__)

# How long a stop waits for an upload to save its checkpoint.
SUSPEND_TIMEOUT = 10.0


@dataclass
class ActiveTransfer:
    """A transfer in progress for one image."""

    key: ImageKey
    identity: tuple[str, int]  # the uid and generation of the image it fills
    progress: Progress = field(default_factory=Progress)
    task: asyncio.Task[Any] | None = None
    feed: UploadFeed | None = None  # an upload's bytes, across the requests that carry them
    saved_spills: frozenset[str] = frozenset()  # the spill files of its last checkpoint
    resumable: bool = False  # it saves checkpoints (an upload into PVC storage)
    cancelled_by: ApiError | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel(self, reason: ApiError) -> None:
        self.cancelled_by = reason
        if self.task is not None:
            self.task.cancel()


class Transfers:
    def __init__(
        self,
        config: ServerConfig,
        states: ImageStates,
        storage: Storage,
        checkpoints: Checkpoints,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.states = states
        self.storage = storage
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.active: dict[ImageKey, ActiveTransfer] = {}
        self.stopping = False

    def get(self, key: ImageKey) -> ActiveTransfer | None:
        return self.active.get(key)

    def new(self, image: Image) -> ActiveTransfer:
        transfer = ActiveTransfer(image.key, image.identity)
        self.active[transfer.key] = transfer
        return transfer

    async def cancel(self, key: ImageKey, reason: ApiError) -> None:
        """Cancels the image's transfer, if any, and waits until it has ended."""
        transfer = self.active.get(key)
        if transfer is not None:
            transfer.cancel(reason)
            await transfer.done.wait()

    async def stop(self) -> None:
        """Uploads into PVC storage save a checkpoint of all they took, then end; every
        other transfer is cancelled. Their images stay as they are."""
        self.stopping = True
        suspending = [t for t in self.active.values() if t.feed is not None and t.resumable]
        for transfer in suspending:
            assert transfer.feed is not None
            transfer.feed.suspend()
        for transfer in suspending:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(transfer.done.wait(), SUSPEND_TIMEOUT)
        for transfer in list(self.active.values()):
            transfer.cancel(Conflict("the server is shutting down; upload again"))

    async def wait_all(self, timeout: float) -> None:
        for transfer in list(self.active.values()):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(transfer.done.wait(), timeout)

    async def run(
        self,
        transfer: ActiveTransfer,
        image: Image,
        open_source: SourceOpener,
        saved: SavedUpload | None = None,
    ) -> Image:
        """Runs one transfer into the image and records its outcome in the status."""
        transfer.task = asyncio.current_task()
        # Uploads into PVC storage save checkpoints, and keep their data over a stop.
        transfer.resumable = (
            transfer.feed is not None
            and uses_pvc(image.manifest)
            and bool(self.config.checkpoint_every)
        )
        self.metrics.active_transfers.inc()
        reporter = asyncio.create_task(self._report_progress(transfer))

        async def open_sink(source: OpenedSource) -> Sink:
            if saved is not None:
                sink = await self.storage.resume_sink(image.manifest, saved.sink)
            else:
                sink = await self.storage.open_sink(image.manifest, source.length, source.filename)
            if not transfer.resumable:
                return sink
            return KeptOnStop(sink, lambda: self.stopping, lambda: self._drop_checkpoint(transfer))

        def options_for(source: OpenedSource) -> PipelineOptions:
            options = self._pipeline_options(image, source.length)
            if transfer.resumable:
                options.checkpoint_every = self.config.checkpoint_every
                options.on_checkpoint = functools.partial(self._save_checkpoint, transfer, source)
            if saved is not None:
                options.resume_from = saved.checkpoint()
            return options

        try:
            image.set_phase(PROVISIONING, PROVISIONING, "Receiving the image")
            self.states.save(image)
            result = await run_transfer(open_source, open_sink, options_for, transfer.progress)
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
            log.exception("transfer into %s failed", shown(transfer.key))
            self._after_failure(transfer, TransferError(f"internal error: {exc}"))
            raise
        finally:
            reporter.cancel()
            self.active.pop(transfer.key, None)
            self.metrics.active_transfers.dec()
            if not self.stopping:
                self._drop_checkpoint(transfer)  # kept only for a restart to continue from
            transfer.done.set()
        self.metrics.transfers.labels("succeeded").inc()
        return self._after_success(transfer, result)

    async def _save_checkpoint(
        self, transfer: ActiveTransfer, source: OpenedSource, checkpoint: Checkpoint
    ) -> None:
        if checkpoint.sink is None or transfer.feed is None:
            return  # this stream cannot be continued after a restart (see importer/formats)
        uid, generation = transfer.identity
        saved = SavedUpload(
            uid,
            generation,
            checkpoint.offset,
            transfer.feed.total,
            source.filename,
            checkpoint.hashes,
            checkpoint.sink,
        )
        transfer.saved_spills = self.checkpoints.save(transfer.key, saved, transfer.saved_spills)
        log.info("upload into %s: checkpoint at byte %d", shown(transfer.key), saved.offset)

    def _drop_checkpoint(self, transfer: ActiveTransfer) -> None:
        self.checkpoints.drop(transfer.key, transfer.saved_spills)
        transfer.saved_spills = frozenset()

    def _pipeline_options(self, image: Image, expected_length: int | None) -> PipelineOptions:
        source = image.source
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

    def current(self, transfer: ActiveTransfer) -> Image | None:
        """The image, if it is still the one the transfer fills."""
        return self.states.current(transfer.key, transfer.identity)

    async def _report_progress(self, transfer: ActiveTransfer) -> None:
        uid = transfer.identity[0]
        last = None
        while True:
            await asyncio.sleep(self.config.status_interval)
            self.metrics.report(uid, transfer.progress)
            image = self.current(transfer)
            if image is None:
                return
            shown_now = (transfer.progress.percent(), transfer.progress.done)
            if shown_now == last:
                continue
            last = shown_now
            image.status["progress"] = transfer.progress.percent()
            image.status["downloadSpeed"] = transfer.progress.speed_status()
            self.states.save(image, durable=False)

    def _after_success(self, transfer: ActiveTransfer, result: TransferResult) -> Image:
        image = self.current(transfer)
        if image is None:
            raise NotFound("the image was deleted or changed during the upload")
        uid = transfer.identity[0]
        self.metrics.report(uid, transfer.progress)
        self.metrics.progress.labels(uid).set(100)
        info = result.image
        image.status.update(
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
        self.states.store.set_received(transfer.key, result.received_bytes)
        self.states.mark_ready(image)
        log.info(
            "image %s is Ready: %d bytes received, %s, virtual size %d",
            shown(transfer.key),
            result.received_bytes,
            info.format,
            info.virtual_size,
        )
        return self.states.save(image)

    def _after_interrupt(self, transfer: ActiveTransfer) -> None:
        image = self.current(transfer)
        if image is None:
            return
        self.states.wait_for_upload(
            image, "The last upload was interrupted; upload the image again"
        )
        image.clear_progress()
        self.states.save(image)

    def _after_failure(self, transfer: ActiveTransfer, error: TransferError) -> None:
        image = self.current(transfer)
        if image is None:
            return
        self.states.fail(image, error)
        self.states.save(image)
