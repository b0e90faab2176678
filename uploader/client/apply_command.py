"""`dvcr-uploader apply -f` and `create -f`: the images of manifests, sent to the server.

`apply` creates what is missing, replaces what changed and leaves the rest; `create` only
creates (an image that exists is AlreadyExists). A manifest's own metadata.namespace is
used; one that differs from an explicit `-n` is refused, as kubectl refuses it.
"""

from __future__ import annotations

import sys
from typing import Any

from uploader.client.api_client import ApiClient, ClientError
from uploader.client.applyinput import load_documents
from uploader.client.targets import manifest_namespace
from uploader.resources import KINDS, STORAGE_REGISTRY


def run(args: Any, client: ApiClient, create_only: bool) -> int:
    failed = False
    for doc in load_documents(args.filename):
        kind_name = doc.get("kind")
        kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
        if kind is None:
            print(
                f'error: no matches for kind "{kind_name}" in version '
                f'"{doc.get("apiVersion")}"; this server has {", ".join(KINDS)}',
                file=sys.stderr,
            )
            failed = True
            continue
        raw_metadata = doc.get("metadata")
        metadata: dict[str, Any] = raw_metadata if isinstance(raw_metadata, dict) else {}
        name = metadata.get("name")
        try:
            namespace = manifest_namespace(doc, args.namespace, args.namespace_given)
            if create_only or not isinstance(name, str) or not name:
                created = client.create(kind, namespace, doc)  # the server says what is wrong
                print(f"{kind.display}/{created['metadata']['name']} created")
                continue
            action = _apply_one(client, doc, kind, namespace, name, metadata)
        except ClientError as exc:
            print(exc.shown(), file=sys.stderr)
            failed = True
            continue
        print(f"{kind.display}/{name} {action}")
    return 1 if failed else 0


def _apply_one(
    client: ApiClient,
    doc: dict[str, Any],
    kind: Any,
    namespace: str,
    name: str,
    metadata: dict[str, Any],
) -> str:
    try:
        current = client.get(kind, namespace, name)
    except ClientError as exc:
        if exc.code != 404:
            raise
        client.create(kind, namespace, doc)
        return "created"
    same = current.get("spec") == _with_defaults(doc.get("spec"))
    if same and all(
        current["metadata"].get(k) == metadata.get(k)
        for k in ("labels", "annotations")
        if k in metadata
    ):
        return "unchanged"
    client.replace(kind, namespace, name, doc)
    return "configured"


def _with_defaults(spec: Any) -> Any:
    if isinstance(spec, dict) and "storage" not in spec:
        return {**spec, "storage": STORAGE_REGISTRY}
    return spec
