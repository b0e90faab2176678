"""User input as an error message quotes it: never more than 200 characters of it."""

from __future__ import annotations

import json
from typing import Any

MAX_QUOTED = 200


def cut(text: str, limit: int = MAX_QUOTED) -> str:
    """`text`, or its first `limit` characters and `…`."""
    return text if len(text) <= limit else f"{text[:limit]}…"


def quoted(value: Any) -> str:
    """A string in double quotes, anything else as JSON (`5`, `["a"]`), cut after 200
    characters, as Kubernetes shows an invalid value."""
    if isinstance(value, str):
        return f'"{cut(value)}"'
    return cut(json.dumps(value, default=str))
