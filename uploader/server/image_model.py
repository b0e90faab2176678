"""An image as the server's core handles it: a typed view of its stored manifest.

The store keeps each image as the JSON object the API serves (`image_db.Object`); `Image`
wraps one such object and names what the core reads and changes in it: its key, its
identity (uid and generation), its phase and the Ready condition that carries the phase's
reason. Changes made through an `Image` are changes of the wrapped object, which the
store saves.

Phases: Pending -> WaitForUserUpload (Upload only) -> Provisioning -> Ready, or Failed with
a reason; Terminating while it is deleted.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from uploader.resources import Kind, ready_condition
from uploader.server.image_db import Object, key_of
from uploader.server.upload_tokens import ImageKey

PENDING = "Pending"
WAIT_FOR_UPLOAD = "WaitForUserUpload"
PROVISIONING = "Provisioning"
READY = "Ready"
FAILED = "Failed"
TERMINATING = "Terminating"

RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime(RFC3339)


def image_key(kind: Kind, namespace: str | None, name: str) -> ImageKey:
    return kind.name, namespace if kind.namespaced and namespace else "", name


def shown(key: ImageKey) -> str:
    """An image's key as logs show it: `VirtualImage/ns/name`."""
    return "/".join(key)


class Image:
    """A stored image: its manifest, with typed access to what the core uses."""

    __slots__ = ("manifest",)

    def __init__(self, manifest: Object) -> None:
        self.manifest = manifest

    @property
    def key(self) -> ImageKey:
        return key_of(self.manifest)

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    @property
    def uid(self) -> str:
        return str(self.manifest["metadata"]["uid"])

    @property
    def generation(self) -> int:
        return int(self.manifest["metadata"].get("generation", 1))

    @property
    def identity(self) -> tuple[str, int]:
        """The uid and generation: a transfer fills the image only while both are its own."""
        return self.uid, self.generation

    @property
    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.manifest["spec"]
        return spec

    @property
    def source(self) -> dict[str, Any]:
        source: dict[str, Any] = self.spec["dataSource"]
        return source

    @property
    def is_upload(self) -> bool:
        return bool(self.source["type"] == "Upload")

    @property
    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.manifest.setdefault("status", {})
        return status

    @property
    def phase(self) -> str | None:
        phase = self.manifest.get("status", {}).get("phase")
        return None if phase is None else str(phase)

    @property
    def upload_token(self) -> str | None:
        """The token of its upload URL, if it has one."""
        url = self.manifest.get("status", {}).get("imageUploadURLs", {}).get("external")
        return str(url).rsplit("/", 1)[-1] if url else None

    def ready_condition(self) -> dict[str, Any] | None:
        return ready_condition(self.status)

    def phase_since(self) -> datetime | None:
        """When the image entered its current phase."""
        ready = self.ready_condition()
        if ready is None or "lastTransitionTime" not in ready:
            return None
        return datetime.strptime(ready["lastTransitionTime"], RFC3339).replace(tzinfo=UTC)

    def set_phase(self, phase: str, reason: str, message: str) -> None:
        status = self.status
        status["phase"] = phase
        ready = "True" if phase == READY else "False"
        current = ready_condition(status)
        if current is None:
            current = {"type": "Ready"}
            status.setdefault("conditions", []).append(current)
        if current.get("status") != ready or current.get("reason") != reason:
            current["lastTransitionTime"] = now_rfc3339()
        current.update(status=ready, reason=reason, message=message)
        status["observedGeneration"] = self.generation

    def clear_progress(self) -> None:
        for name in ("progress", "downloadSpeed"):
            self.status.pop(name, None)
