"""The documents of `apply -f FILE|-`: YAML or JSON, one or many, `kind: List` unfolded.
Whatever is wrong with the input is one ManifestError with a one-line message, worded as
kubectl words it where it has a word for it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from uploader.quoting import yaml_problem


class ManifestError(Exception):
    pass


def load_documents(filename: str) -> list[dict[str, Any]]:
    """The objects to apply, each a mapping; at least one."""
    text = _read(filename)
    try:
        loaded = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"error parsing {_name(filename)}: {yaml_problem(exc)}") from None
    docs: list[dict[str, Any]] = []
    for number, doc in enumerate(loaded, 1):
        items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
        if not isinstance(items, list):
            raise ManifestError(f"{_name(filename)}: document {number}: items is not a list")
        for item in items:
            if not isinstance(item, dict):
                raise ManifestError(
                    f"{_name(filename)}: document {number} is not an object "
                    f"(a mapping with apiVersion, kind, metadata, spec) but a "
                    f"{type(item).__name__}"
                )
            docs.append(item)
    if not docs:
        raise ManifestError("no objects passed to apply")
    return docs


def _read(filename: str) -> str:
    try:
        if filename == "-":
            return sys.stdin.buffer.read().decode()
        return Path(filename).read_bytes().decode()
    except FileNotFoundError:
        raise ManifestError(f'the path "{filename}" does not exist') from None
    except IsADirectoryError:
        raise ManifestError(
            f'the path "{filename}" is a directory; give one file, or - for standard input'
        ) from None
    except OSError as exc:
        raise ManifestError(f"cannot read {_name(filename)}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{_name(filename)} is not UTF-8 text") from None


def _name(filename: str) -> str:
    return "standard input" if filename == "-" else filename
