"""Imports and copies: images filled from a data source other than an upload.

An import first waits, in Pending and saying why, until its source can be read (another
image that is not Ready yet, a disk in use); a source that will never be there fails the
image. Then it runs as a transfer (uploader/server/transfers.py), or, from one DVCR image
into another, as a copy that moves no bytes. While an import reads another image, that
image is not deleted under it: its deletion waits in Terminating (`ReadLocks`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from importer.errors import TransferError
from uploader.errors import ApiError
from uploader.server.data_sources import ImportPlan, SourceNotReady, SourcePlanner
from uploader.server.destinations import Storage
from uploader.server.image_model import PENDING, PROVISIONING, Image, shown
from uploader.server.image_states import ImageStates
from uploader.server.transfers import Transfers
from uploader.server.upload_tokens import ImageKey

log = logging.getLogger(__name__)

# How often an import that waits for its source looks again.
SOURCE_POLL_INTERVAL = 0.5


class ReadLocks:
    """Images being read by imports. Deleting one is put off until the last reader ends;
    then `on_last_reader` finishes the deletion."""

    def __init__(self) -> None:
        self._readers: collections.Counter[ImageKey] = collections.Counter()
        self._deferred: set[ImageKey] = set()
        self._background: set[asyncio.Task[None]] = set()
        self.on_last_reader: Callable[[ImageKey], Coroutine[Any, Any, None]] | None = None

    def is_read(self, key: ImageKey) -> bool:
        return bool(self._readers[key])

    def is_deferred(self, key: ImageKey) -> bool:
        return key in self._deferred

    def defer_delete(self, key: ImageKey) -> None:
        self._deferred.add(key)

    @contextlib.contextmanager
    def reading(self, key: ImageKey | None) -> Iterator[None]:
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
                if key in self._deferred and self.on_last_reader is not None:
                    self._deferred.discard(key)
                    task = asyncio.create_task(self.on_last_reader(key))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    @property
    def background(self) -> set[asyncio.Task[None]]:
        return self._background


class Imports:
    def __init__(
        self,
        states: ImageStates,
        storage: Storage,
        planner: SourcePlanner,
        transfers: Transfers,
        locks: ReadLocks,
    ) -> None:
        self.states = states
        self.storage = storage
        self.planner = planner
        self.transfers = transfers
        self.locks = locks
        self._running: dict[ImageKey, asyncio.Task[None]] = {}

    def start(self, image: Image) -> None:
        key = image.key
        task = asyncio.create_task(self._run(image))
        self._running[key] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._running.get(key) is done:
                del self._running[key]

        task.add_done_callback(forget)

    async def cancel(self, key: ImageKey) -> None:
        """Cancels an import that still waits for its source, and waits until it ended."""
        waiting = self._running.get(key)
        if waiting is not None and waiting is not asyncio.current_task():
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiting

    async def stop(self) -> None:
        for task in list(self._running.values()):
            task.cancel()

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._running.values())

    async def _run(self, image: Image) -> None:
        try:
            plan = await self._wait_for_source(image)
        except TransferError as exc:
            current = self.states.get(image.key)
            if current is not None and current.uid == image.uid:
                self.states.fail(current, exc)
                self.states.save(current)
            return
        try:
            # The outcome is in the image's status; nobody waits for this task.
            with (
                self.locks.reading(plan.source_image),
                contextlib.suppress(TransferError, ApiError),
            ):
                if plan.copy_from is not None:
                    await self._copy(image, plan)
                else:
                    assert plan.open_source is not None
                    await self.transfers.run(self.transfers.new(image), image, plan.open_source)
        finally:
            plan.release()

    async def _wait_for_source(self, image: Image) -> ImportPlan:
        """Plans the import, waiting in Pending (and saying why) while the source is not
        ready to be read."""
        shown_message = None
        while True:
            try:
                return await self.planner.plan(image.manifest)
            except SourceNotReady as waiting:
                if waiting.message != shown_message:
                    shown_message = waiting.message
                    current = self.states.get(image.key) or image
                    current.set_phase(PENDING, "ProvisioningNotStarted", waiting.message)
                    image = self.states.save(current)
                await asyncio.sleep(SOURCE_POLL_INTERVAL)

    async def _copy(self, image: Image, plan: ImportPlan) -> None:
        """One DVCR image into another without moving bytes: the new tag shares the blobs."""
        assert plan.copy_from is not None
        repo, tag = plan.copy_from
        image.set_phase(PROVISIONING, PROVISIONING, "Copying the image within DVCR")
        image = self.states.save(image)
        try:
            await self.storage.copy_image(repo, tag, image.manifest)
        except TransferError as exc:
            self.states.fail(image, exc)
            self.states.save(image)
            raise
        current = self.states.get(image.key)
        if current is None or current.uid != image.uid:
            await self.storage.remove_data(image.manifest)  # deleted meanwhile
            return
        if current.generation != image.generation:
            return  # the spec changed meanwhile; its own import fills the image
        source = plan.source_status
        current.status.update(
            progress="100%",
            **{k: source[k] for k in ("size", "format", "cdrom", "checksum") if k in source},
        )
        self.states.mark_ready(current)
        log.info("image %s is Ready: copied from %s:%s", shown(current.key), repo, tag)
        self.states.save(current)
