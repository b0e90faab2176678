"""Filesystem paths built from what users name: every one goes through `under()`.

Names are validated long before (uploader/resources.py); this is the last check, where a
path is made: each part is one plain file name, and the path stays below its root.
"""

from __future__ import annotations

import os
from pathlib import Path

from importer.errors import ProvisioningFailed
from uploader.quoting import quoted

NAME_MAX = 255  # bytes in one file name (Linux, every common filesystem)


class UnsafePath(ProvisioningFailed):
    """A name that cannot be a file name below the root (an image stored before names
    were limited, or a bug)."""

    http_status = 422


def _check_part(part: str) -> None:
    why = None
    if not part or part in (".", ".."):
        why = "is not a file name"
    elif "/" in part or "\0" in part:
        why = "holds a / or NUL"
    elif len(os.fsencode(part)) > NAME_MAX:
        why = f"is longer than the {NAME_MAX} bytes a file name may have"
    if why is not None:
        raise UnsafePath(f"{quoted(part)} {why}")


def under(root: Path, *parts: str, follow_last: bool = False) -> Path:
    """`root/part/part...`, each part one file name, below `root` once links are followed.

    `root` itself may be a link (an operator may put the data elsewhere). A link as the
    last part is followed only with `follow_last`; otherwise where it points is the
    operator's choice (a mounted secret, say).
    """
    for part in parts:
        _check_part(part)
    path = root.joinpath(*parts)
    base = os.path.realpath(root)
    reached = os.path.realpath(path if follow_last else path.parent)
    below = reached.startswith(base.rstrip(os.sep) + os.sep)
    if not (below or (reached == base and not follow_last)):
        raise UnsafePath(f"{path} leads outside {root}")
    return path
