"""Images after a restart, and images that waited too long for their upload.

At start, every stored image is brought back to a steady state: a deletion that was under
way ends; Ready and Failed images keep their upload URL's answer; an upload into PVC
storage whose checkpoint is of its very upload waits for the rest; any other transfer cut
by the stop starts over. One image that cannot be brought back fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from importer.errors import ProvisioningFailed, TransferError
from uploader.errors import ApiError
from uploader.server.checkpoints import Checkpoints
from uploader.server.destinations import Storage
from uploader.server.image_db import Store
from uploader.server.image_model import (
    FAILED,
    PENDING,
    PROVISIONING,
    READY,
    TERMINATING,
    WAIT_FOR_UPLOAD,
    Image,
    shown,
)
from uploader.server.image_states import ImageStates
from uploader.server.lifecycle import ImageLifecycle
from uploader.server.transfers import Transfers
from uploader.server.upload_tokens import UploadTokens

log = logging.getLogger(__name__)


class UploadTimedOut(TransferError):
    reason = "WaitForUserUploadTimeout"
    http_status = 408


class Recovery:
    def __init__(
        self,
        store: Store,
        states: ImageStates,
        tokens: UploadTokens,
        storage: Storage,
        checkpoints: Checkpoints,
        transfers: Transfers,
        lifecycle: ImageLifecycle,
    ) -> None:
        self.store = store
        self.states = states
        self.tokens = tokens
        self.storage = storage
        self.checkpoints = checkpoints
        self.transfers = transfers
        self.lifecycle = lifecycle

    async def recover_all(self) -> None:
        for manifest in self.store.all():
            image = Image(manifest)
            try:
                await self._recover(image)
            except Exception as exc:
                # One image that cannot be brought back fails; the server and the others go on.
                log.exception("image %s could not be recovered", shown(image.key))
                self._fail(image, exc)
        kept = self.checkpoints.kept_sinks()
        await asyncio.to_thread(self.storage.clean_spill_dir, kept)

    def _fail(self, image: Image, error: Exception) -> None:
        key = image.key
        self.checkpoints.take(key)
        if image.phase == TERMINATING:
            self.tokens.forget(key)
            with contextlib.suppress(Exception):
                self.store.delete(key)  # its data may stay behind; the log says why
            return
        self.states.fail(
            image,
            ProvisioningFailed(
                f"the server could not bring the image back after a restart: {error}"
            ),
        )
        with contextlib.suppress(Exception):
            self.states.save(image)

    async def _recover(self, image: Image) -> None:
        key = image.key
        phase = image.phase
        if phase == TERMINATING:
            await self.storage.remove_data(image.manifest)
            self.store.delete(key)
        elif phase == READY:
            self.tokens.mark_ready(image.upload_token, key)
        elif phase == FAILED:
            self.tokens.mark_failed(image.upload_token, key)
        elif phase in (PENDING, WAIT_FOR_UPLOAD, PROVISIONING):
            token = image.upload_token
            saved = self.checkpoints.load(image)
            if saved is None:
                # A transfer cut by a stop: its partial data is dropped, the image starts over.
                self.store.drop_checkpoint(key)
                await asyncio.to_thread(self.storage.remove_partial, image.manifest)
            if image.is_upload and token:
                self.tokens.wait(token, key)
                message = "Waiting for upload"
                image.clear_progress()
                if saved is not None:
                    self.checkpoints.keep(key, saved)
                    message = (
                        f"The server restarted; the upload continues at byte {saved.offset}: "
                        f"curl -C {saved.offset} -T FILE URL"
                    )
                    if saved.total:
                        image.status["progress"] = f"{saved.offset / saved.total * 100:.1f}%"
                self.states.wait_for_upload(image, message)
                self.states.save(image)
            else:
                self.lifecycle.begin(image)

    async def expire_waiting_uploads(self, timeout: float) -> None:
        """Fails images that waited for their upload longer than the server allows."""
        while True:
            await asyncio.sleep(min(30.0, max(timeout / 4, 0.2)))
            now = datetime.now(UTC)
            for manifest in self.store.all():
                image = Image(manifest)
                if image.phase != WAIT_FOR_UPLOAD or self.transfers.get(image.key) is not None:
                    continue
                since = image.phase_since()
                assert since is not None  # every phase change sets it
                if (now - since).total_seconds() >= timeout:
                    self.states.fail(
                        image,
                        UploadTimedOut(
                            f"no upload arrived within {timeout:g} s; delete the image and "
                            "create it again to upload"
                        ),
                    )
                    with contextlib.suppress(ApiError):  # a full disk: tried again next round
                        self.states.save(image)
