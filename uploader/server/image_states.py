"""Where an image's state changes are recorded: its stored manifest and its upload URL.

Every part of the server that moves an image to another phase does it here, so the phase,
the Ready condition, the token index (what the upload URL answers) and the store (what
watchers see and what survives a restart) never disagree.
"""

from __future__ import annotations

import logging

from importer.errors import TransferError
from uploader.server.image_db import Store
from uploader.server.image_model import FAILED, READY, WAIT_FOR_UPLOAD, Image, shown
from uploader.server.upload_tokens import ImageKey, UploadTokens

log = logging.getLogger(__name__)
# Ends the message of every Failed image: a Failed image starts over when its spec changes
# (uploader/server/lifecycle.py), which an unchanged `apply` does not do.
START_OVER = (
    "; to start over, apply the image with a changed spec, or delete it and create it again"
)


class ImageStates:
    def __init__(self, store: Store, tokens: UploadTokens) -> None:
        self.store = store
        self.tokens = tokens

    def get(self, key: ImageKey) -> Image | None:
        manifest = self.store.get(key)
        return Image(manifest) if manifest is not None else None

    def current(self, key: ImageKey, identity: tuple[str, int]) -> Image | None:
        """The image, if it is still the one (same uid and generation) that `identity`
        names: a transfer that outlived a deletion or a new spec changes nothing."""
        image = self.get(key)
        if image is None or image.identity != identity:
            return None
        return image

    def save(self, image: Image, durable: bool = True, essential: bool = False) -> Image:
        return Image(self.store.save(image.manifest, durable=durable, essential=essential))

    def fail(self, image: Image, error: TransferError) -> None:
        """Failed, with the error's reason; its upload URL answers 410 from now on. The
        message says how to start over, and the error carries the same message, so the
        request that failed answers what the image says."""
        self.tokens.mark_failed(image.upload_token, image.key)
        log.info("image %s failed: %s: %s", shown(image.key), error.reason, error.message)
        if not error.message.endswith(START_OVER):
            error.message = f"{error.message.rstrip('. ')}{START_OVER}"
        image.set_phase(FAILED, error.reason, error.message)

    def mark_ready(self, image: Image) -> None:
        self.tokens.mark_ready(image.upload_token, image.key)
        image.set_phase(READY, READY, "The image is ready")

    @staticmethod
    def wait_for_upload(image: Image, message: str) -> None:
        image.set_phase(WAIT_FOR_UPLOAD, "WaitForUserUpload", message)
