"""Where an image's data lives, per its `spec.storage`, in the embedded default layout.

PersistentVolumeClaim: the claim `vi-{name}` is the directory `DATA_DIR/pvc/{ns}/vi-{name}/`.
A filesystem claim holds `disk.img`. An operator makes it a block claim by placing, before
the image is created, a symlink named `block` in that directory that points at a block
device or a pre-sized file; the image is then written there in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from importer.errors import ProvisioningFailed
from importer.formats.base import Converter, Limits, RawTarget
from importer.formats.raw import RawConverter
from importer.pipeline import Sink
from importer.sinks.pvc import BlockClaimTarget, ClaimTarget, FileClaimTarget, PvcSink
from importer.sinks.throttle import ThrottledTarget, sink_rate_from_env
from uploader.config import ServerConfig
from uploader.resources import STORAGE_PVC
from uploader.store import Object

BLOCK_LINK = "block"


def claim_name(obj: Object) -> str:
    return f"vi-{obj['metadata']['name']}"


def claim_dir(obj: Object, config: ServerConfig) -> Path:
    return config.pvc_root / obj["metadata"]["namespace"] / claim_name(obj)


def target_status(obj: Object, config: ServerConfig) -> dict[str, str]:
    if obj["spec"]["storage"] == STORAGE_PVC:
        return {"persistentVolumeClaimName": claim_name(obj)}
    return {}


def make_decoder(target: RawTarget, config: ServerConfig) -> Converter:
    return RawConverter(target, Limits(max_virtual_size=config.max_image_size))


def _claim_target(obj: Object, config: ServerConfig) -> ClaimTarget:
    directory = claim_dir(obj, config)
    block = directory / BLOCK_LINK
    if block.is_symlink() or block.exists():
        return BlockClaimTarget(block.resolve())
    return FileClaimTarget(directory, capacity=config.max_image_size)


def check_supported(obj: Object) -> None:
    """Raises when this server cannot store the image the way its spec asks."""
    if obj["spec"]["storage"] != STORAGE_PVC:
        raise ProvisioningFailed(
            "storage ContainerRegistry (DVCR) is not available on this server yet; "
            "use spec.storage: PersistentVolumeClaim"
        )


def open_sink(obj: Object, config: ServerConfig) -> Sink:
    """The sink for one transfer into the image's storage."""
    check_supported(obj)
    target: ClaimTarget = _claim_target(obj, config)
    rate = sink_rate_from_env()
    if rate:
        target = ThrottledTarget(target, rate)  # type: ignore[assignment]
    return PvcSink(target, make_decoder(target, config))


def remove_partial(obj: Object, config: ServerConfig) -> None:
    """Drops what an interrupted transfer left (after a crash the abort never ran)."""
    if obj["spec"]["storage"] == STORAGE_PVC:
        with contextlib.suppress(FileNotFoundError):
            (claim_dir(obj, config) / ".disk.img.partial").unlink()


def remove_data(obj: Object, config: ServerConfig) -> None:
    """Deletes the image's stored data. A block claim's device is the operator's: left as is."""
    if obj.get("spec", {}).get("storage") != STORAGE_PVC:
        return
    directory = claim_dir(obj, config)
    if (directory / BLOCK_LINK).is_symlink() or (directory / BLOCK_LINK).exists():
        return
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(directory.parent)
