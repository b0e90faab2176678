"""The pod's termination message, which Deckhouse's controller reads from the container's
last state: the JSON of Deckhouse's binary, fields left out when zero or empty as Go's
`omitempty` does, `duration` in nanoseconds (Go's time.Duration), `average-speed` in
bytes per second; plus `checksum`, the checksums of the bytes as received.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from uploader.server.image_model import READY
from uploader.server.image_states import START_OVER

log = logging.getLogger(__name__)
# The kubelet keeps at most 4096 bytes of a termination message.
MAX_MESSAGE_BYTES = 4096


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def outcome_message(image: dict[str, Any], received: int, duration: float) -> dict[str, Any]:
    """The message for an image that is Ready or Failed; `duration` in seconds."""
    status: dict[str, Any] = image.get("status", {})
    if status.get("phase") != READY:
        ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)
        reason = ready.get("reason", "Failed") if ready else "Failed"
        # The server's advice on starting over is about its API; the pod is started over
        # by the kubelet or the controller.
        text = str(ready.get("message", "") if ready else "").removesuffix(START_OVER)
        return {"error-message": f"{reason}: {text}"[:2048]}
    fields: dict[str, Any] = {
        "source-image-size": received,
        "source-image-virtual-size": _int(status.get("size", {}).get("unpackedBytes", 0)),
        "source-image-format": status.get("format") or "",
        "duration": int(duration * 1e9),
        "average-speed": int(received / duration) if duration > 0 else 0,
        "checksum": status.get("checksum") or {},
    }
    return {key: value for key, value in fields.items() if value}


def write_message(path: Path, message: dict[str, Any]) -> None:
    text = json.dumps(message, separators=(",", ":"))
    if len(text.encode()) > MAX_MESSAGE_BYTES:
        text = json.dumps({"error-message": message.get("error-message", "")[:1024]})
    try:
        path.write_text(text)
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc.strerror)
    log.info("termination message: %s", text)
