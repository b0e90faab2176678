"""`dvcr-uploader delete`: images by name (`vi a b`, `vi/a`), every image of a kind in the
namespace (`--all`), those a label selector selects (`-l`), or those of manifests (`-f`).
As kubectl's, it waits until they are gone unless `--wait=false`."""

from __future__ import annotations

import sys
import time
from typing import Any

from uploader.client.api_client import ApiClient, ClientError
from uploader.client.applyinput import load_documents
from uploader.client.targets import Target, kind_of, manifest_namespace, parse_targets
from uploader.resources import KINDS, Kind

POLL = 0.2


def run(args: Any, client: ApiClient) -> int:
    words = [w for w in (args.resource, *args.names) if w is not None]
    if args.filename is not None:
        if words:
            raise ClientError("when -f is given, no resources and names are given as arguments")
        deletions = _from_manifests(args)
    else:
        deletions = _from_arguments(args, client, words)
    failed = False
    deleted = []
    for kind, namespace, name in deletions:
        try:
            client.delete(kind, namespace, name)
        except ClientError as exc:
            if not exc.per_object:
                raise
            if exc.code == 404 and args.ignore_not_found:
                continue
            print(exc.shown(), file=sys.stderr)
            failed = True
            continue
        print(f'{kind.display} "{name}" deleted')
        deleted.append((kind, namespace, name))
    if args.wait and not _gone(client, deleted, args.timeout):
        failed = True
    return 1 if failed else 0


def _gone(client: ApiClient, deleted: list[tuple[Kind, str, str]], timeout: float) -> bool:
    """Waits until the deleted images are gone (one that imports read stays Terminating
    until they end); `timeout` 0: as long as it takes."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    for kind, namespace, name in deleted:
        while client.call("GET", client.path(kind, namespace, name))[0] != 404:
            if deadline is not None and time.monotonic() >= deadline:
                print(
                    f"error: timed out waiting for {kind.plural}/{name} to be deleted",
                    file=sys.stderr,
                )
                return False
            time.sleep(POLL)
    return True


def _from_arguments(args: Any, client: ApiClient, words: list[str]) -> list[tuple[Kind, str, str]]:
    targets = parse_targets(words) if words else []
    if not targets:
        raise ClientError(
            "You must provide one or more resources by argument or filename. Example resource "
            "specifications include: '-f vi.yaml', 'vi some-image', 'vi/some-image', 'vi --all'"
        )
    selecting = args.all or args.selector is not None
    named = [t for t in targets if t.name is not None]
    if selecting and named:
        raise ClientError("name cannot be provided when a selector or --all is specified")
    if not selecting and not named:
        raise ClientError(
            "resource(s) were provided, but no name was specified; give names, --all or -l"
        )
    if named:
        return [(t.kind, args.namespace, t.name) for t in named if t.name is not None]
    deletions = []
    for target in targets:
        for obj in _selected(client, target, args):
            deletions.append((target.kind, args.namespace, str(obj["metadata"]["name"])))
    if not deletions:
        where = f" in {args.namespace} namespace" if any(t.kind.namespaced for t in targets) else ""
        print(f"No resources found{where}", file=sys.stderr)
    return deletions


def _selected(client: ApiClient, target: Target, args: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.list(target.kind, args.namespace, args.selector)["items"]
    return items


def _from_manifests(args: Any) -> list[tuple[Kind, str, str]]:
    deletions = []
    for doc in load_documents(args.filename):
        kind_name = doc.get("kind")
        kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
        if kind is None:
            kind = kind_of(str(kind_name))
        metadata = doc.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        if not isinstance(name, str) or not name:
            raise ClientError(f"{args.filename}: a {kind.name} without metadata.name")
        namespace = manifest_namespace(doc, args.namespace, args.namespace_given)
        deletions.append((kind, namespace, name))
    return deletions
