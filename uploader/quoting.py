"""User input as an error message quotes it: never more than 200 characters of it."""

from __future__ import annotations

import json
from typing import Any

import yaml

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


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line, where it is and what is wrong, without its excerpt of
    the text."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        context = getattr(exc, "context", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{where}: {problem}" + (f" ({context})" if context else "")
    return " ".join(str(exc).split())
