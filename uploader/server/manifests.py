"""Manifests the API receives: JSON as JSON, YAML without aliases, bounded in size, depth
and nodes, parsed off the event loop.

YAML is checked event by event before any object is built, so an alias bomb or a deeply
nested body is refused at the cost of reading it once; messages quote little of the input.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from uploader.errors import BadRequest
from uploader.quoting import cut, yaml_problem

MAX_MANIFEST_SIZE = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 10_000

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Two threads of their own: a crowd of big manifests waits for them, and the threads that
# storage work runs on (asyncio's default pool) stay free.
_PARSERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="manifest")


async def parse_manifest(body: bytes, content_type: str = "") -> Any:
    if len(body) > MAX_MANIFEST_SIZE:
        raise BadRequest(f"the manifest is larger than {MAX_MANIFEST_SIZE} bytes")
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise BadRequest("the manifest is not UTF-8 text") from None
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_PARSERS, parse_manifest_text, text, content_type)


def parse_manifest_text(text: str, content_type: str = "") -> Any:
    if content_type == "application/json":
        return _parse_json(text)
    _check_yaml_events(text)
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise _not_yaml(exc) from None


def _parse_json(text: str) -> Any:
    try:
        doc = json.loads(text)
    except RecursionError:
        raise BadRequest(f"the manifest is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {_quote(str(exc))}") from None
    _check_tree(doc)
    return doc


def _check_tree(doc: Any) -> None:
    """Depth and node count of a parsed JSON document, without recursion."""
    nodes = 0
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise BadRequest(f"the manifest has more than {MAX_NODES} nodes")
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise BadRequest(f"the manifest is nested deeper than {MAX_DEPTH} levels")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
            if isinstance(value, dict):
                nodes += len(value)  # the keys


def _check_yaml_events(text: str) -> None:
    documents = depth = nodes = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.AliasEvent):
                raise BadRequest("YAML aliases (*name) are not accepted in manifests")
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
            elif isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise BadRequest(f"the manifest is nested deeper than {MAX_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_NODES:
                    raise BadRequest(f"the manifest has more than {MAX_NODES} nodes")
    except yaml.YAMLError as exc:
        if "nesting depth" in str(exc):  # libyaml's own bound, met before the events come
            raise BadRequest(f"the manifest is nested deeper than {MAX_DEPTH} levels") from None
        raise _not_yaml(exc) from None
    if documents == 0:
        raise BadRequest("the manifest is empty")
    if documents > 1:
        raise BadRequest(f"the body holds {documents} YAML documents; send one object")


def _not_yaml(exc: yaml.YAMLError) -> BadRequest:
    return BadRequest(f"the body is neither JSON nor YAML: {cut(yaml_problem(exc))}")


def _quote(text: str) -> str:
    return cut(" ".join(text.split()))
