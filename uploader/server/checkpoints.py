"""Checkpoints of uploads into PVC storage, from which an upload continues after a restart.

While an upload runs, the pipeline hands over, every `--checkpoint-every` bytes, the hash
states and the sink's snapshot (see importer/formats/snapshot.py); each is saved in the
store with the upload's uid and generation, and its spill files are kept until a newer
checkpoint replaces it. After a restart, an image whose checkpoint is of its very upload
waits for the rest of it (`kept`), instead of starting over.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from importer.pipeline import Checkpoint
from uploader.server.destinations import Storage, spill_files_of
from uploader.server.image_db import Store
from uploader.server.image_model import Image
from uploader.server.upload_tokens import ImageKey


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

    @property
    def spill_files(self) -> frozenset[str]:
        return spill_files_of(self.sink)


class Checkpoints:
    def __init__(self, store: Store, storage: Storage) -> None:
        self._store = store
        self._storage = storage
        # Uploads cut by a restart that continue from their last checkpoint.
        self._kept: dict[ImageKey, SavedUpload] = {}

    def load(self, image: Image) -> SavedUpload | None:
        """The image's stored checkpoint, if it is one of this very upload."""
        found = self._store.checkpoint(image.key)
        if found is None:
            return None
        saved = SavedUpload.load(*found)
        if (saved.uid, saved.generation) != image.identity:
            return None
        return saved

    def keep(self, key: ImageKey, saved: SavedUpload) -> None:
        self._kept[key] = saved

    def kept(self, key: ImageKey) -> SavedUpload | None:
        return self._kept.get(key)

    def take(self, key: ImageKey) -> SavedUpload | None:
        """The kept checkpoint, which a new transfer continues from: no longer kept."""
        return self._kept.pop(key, None)

    def kept_sinks(self) -> list[bytes]:
        return [saved.sink for saved in self._kept.values()]

    def forget(self, image: Image) -> None:
        """Drops the image's checkpoint with its partial data: the upload starts over."""
        saved = self._kept.pop(image.key, None)
        self._store.drop_checkpoint(image.key)
        self._storage.remove_partial(image.manifest)
        if saved is not None:
            self._storage.drop_spill_files(saved.spill_files)

    def save(self, key: ImageKey, saved: SavedUpload, previous: frozenset[str]) -> frozenset[str]:
        """Stores a newer checkpoint; the spill files only the previous one needed go.
        Returns the spill files this one needs."""
        self._store.save_checkpoint(key, saved.record(), saved.sink)
        spills = saved.spill_files
        self._storage.drop_spill_files(previous - spills)
        return spills

    def drop(self, key: ImageKey, spills: Iterable[str]) -> None:
        """Nothing to continue from: the image is committed, or its transfer ended."""
        self._store.drop_checkpoint(key)
        self._storage.drop_spill_files(spills)
