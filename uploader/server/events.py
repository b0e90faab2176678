"""What happened to each image, as Kubernetes events: kept in memory, the last few per image.

An event is recorded whenever an image's Ready condition gets another phase, reason or
message: every phase change (Pending, WaitForUserUpload, Provisioning with the byte an
upload continues from, Ready, Failed with its reason) passes through the store
(uploader/server/image_db.py), which shows each change here. An event equal to one already
kept (same type, reason and message) counts as a repeat of it: its count goes up and its
last timestamp moves. Events do not survive a restart, as in Kubernetes after an hour.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from uploader.resources import ready_condition
from uploader.server.upload_tokens import ImageKey

Object = dict[str, Any]
EVENTS_PER_IMAGE = 10
COMPONENT = "dvcr-uploader"
FAILED = "Failed"  # the phase whose events are warnings (image_model.py imports the store)


@dataclass
class ImageEvent:
    type: str  # Normal | Warning
    reason: str
    message: str
    first: str  # RFC 3339
    last: str
    count: int
    sequence: int  # orders events recorded within the same second


class ImageEvents:
    def __init__(self, per_image: int = EVENTS_PER_IMAGE) -> None:
        self._per_image = per_image
        self._events: dict[ImageKey, deque[ImageEvent]] = {}
        self._sequence = itertools.count()

    def observe(self, key: ImageKey, before: Object | None, after: Object) -> None:
        """Records the change from `before` (None: a new image) to `after`, if its
        condition changed."""
        now = _signature(after)
        if now is not None and now != _signature(before):
            phase, reason, message = now
            self.record(key, "Warning" if phase == FAILED else "Normal", reason, message)

    def record(self, key: ImageKey, event_type: str, reason: str, message: str) -> None:
        kept = self._events.setdefault(key, deque(maxlen=self._per_image))
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for event in kept:
            if (event.type, event.reason, event.message) == (event_type, reason, message):
                kept.remove(event)
                event.count += 1
                event.last = stamp
                event.sequence = next(self._sequence)
                kept.append(event)
                return
        kept.append(ImageEvent(event_type, reason, message, stamp, stamp, 1, next(self._sequence)))

    def forget(self, key: ImageKey) -> None:
        self._events.pop(key, None)

    def of(self, key: ImageKey) -> list[ImageEvent]:
        """The image's events, oldest first."""
        return list(self._events.get(key, ()))

    def event_list(self, image: Object) -> Object:
        """The image's events as a Kubernetes v1 EventList."""
        meta = image["metadata"]
        key: ImageKey = (image["kind"], meta.get("namespace", ""), meta["name"])
        involved = {
            "apiVersion": image.get("apiVersion"),
            "kind": image["kind"],
            "name": meta["name"],
            "uid": meta.get("uid"),
            **({"namespace": meta["namespace"]} if meta.get("namespace") else {}),
        }
        items = [
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{meta['name']}.{event.sequence:x}",
                    "namespace": meta.get("namespace", "default"),
                },
                "involvedObject": involved,
                "type": event.type,
                "reason": event.reason,
                "message": event.message,
                "firstTimestamp": event.first,
                "lastTimestamp": event.last,
                "count": event.count,
                "source": {"component": COMPONENT},
            }
            for event in self.of(key)
        ]
        return {"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items}


def _signature(obj: Object | None) -> tuple[str, str, str] | None:
    status = obj.get("status") if obj is not None else None
    if not isinstance(status, dict):
        return None
    condition = ready_condition(status)
    if condition is None:
        return None
    return (
        str(status.get("phase", "")),
        str(condition.get("reason", "")),
        str(condition.get("message", "")),
    )
