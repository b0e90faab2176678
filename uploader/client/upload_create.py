"""The image of `dvcr-uploader upload FILE --create NAME`: made when it is missing, reused
when it waits for an upload, refused otherwise.

An image of that name that takes an upload and is not done yet (Pending, waiting for its
upload, or with an upload under way that broke off) is the one the file goes to: running
the same command again continues an interrupted upload. One that is Ready or Failed, that
takes its data from somewhere else, or whose storage is not the `--storage` asked for, is
refused with what to do instead; nothing is sent to it.
"""

from __future__ import annotations

import sys
from typing import Any

from uploader.client.api_client import ApiClient, ClientError
from uploader.client.resumable_upload import EXIT_REFUSED, UploadFailed
from uploader.resources import (
    API_VERSION,
    CLUSTER_VIRTUAL_IMAGE,
    STORAGE_PVC,
    STORAGE_REGISTRY,
    VIRTUAL_IMAGE,
    Kind,
)

STORAGES = (STORAGE_REGISTRY, STORAGE_PVC)
DEFAULT_STORAGE = STORAGE_REGISTRY  # the server's default, and the README's examples'


def kind_of(args: Any) -> Kind:
    return CLUSTER_VIRTUAL_IMAGE if args.cluster else VIRTUAL_IMAGE


def manifest(kind: Kind, name: str, storage: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind.name,
        "metadata": {"name": name},
        "spec": {"storage": storage, "dataSource": {"type": "Upload"}},
    }


def ensure_image(client: ApiClient, args: Any, what: str) -> str:
    """Makes or finds the image `--create` names; returns it as `vi/NAME` (`cvi/NAME`).
    UploadFailed when it exists and cannot take `what` (the file's name)."""
    kind, name = kind_of(args), args.create
    if kind is CLUSTER_VIRTUAL_IMAGE and args.storage not in (None, STORAGE_REGISTRY):
        raise UploadFailed(
            f"a ClusterVirtualImage is stored in DVCR only: --storage {STORAGE_REGISTRY}",
            EXIT_REFUSED,
        )
    storage = args.storage or DEFAULT_STORAGE
    label = f"{kind.display}/{name}"
    image = _get(client, kind, args.namespace, name)
    if image is None:
        try:
            client.create(kind, args.namespace, manifest(kind, name, storage))
        except ClientError as exc:
            if exc.code != 409:
                raise _refused(exc) from None
            image = _get(client, kind, args.namespace, name)  # made meanwhile: check it
        else:
            print(f"{label} created", file=sys.stderr)
            return f"{kind.short}/{name}"
    if image is not None:
        _check_reusable(image, kind, args, what)
        print(f"{label} exists and waits for an upload: {what} goes to it", file=sys.stderr)
    return f"{kind.short}/{name}"


def _check_reusable(image: dict[str, Any], kind: Kind, args: Any, what: str) -> None:
    name = args.create
    shown = f'{kind.display} "{name}"'
    spec = image.get("spec") or {}
    status = image.get("status") or {}
    source = (spec.get("dataSource") or {}).get("type")
    if source != "Upload":
        raise UploadFailed(
            f"{shown} already exists and takes its data from {source}, not from an upload; "
            "choose another name, or delete it first",
            EXIT_REFUSED,
        )
    if args.storage is not None and spec.get("storage") != args.storage:
        raise UploadFailed(
            f"{shown} already exists with storage {spec.get('storage')}, not {args.storage}; "
            f"give --storage {spec.get('storage')} to upload to it, or delete it first",
            EXIT_REFUSED,
        )
    phase = status.get("phase")
    if phase == "Ready":
        raise UploadFailed(
            f"{shown} already exists and is Ready; to compare {what} with it: "
            f"dvcr-uploader upload {what} {kind.short}/{name}; to replace it, delete it first",
            EXIT_REFUSED,
        )
    if phase == "Failed":
        condition: dict[str, Any] = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        raise UploadFailed(
            f"{shown} already exists and Failed ({condition.get('reason', 'Failed')}): "
            f"{condition.get('message', '')}; delete it first to upload again",
            EXIT_REFUSED,
        )


def _get(client: ApiClient, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return client.get(kind, namespace, name)
    except ClientError as exc:
        if exc.code == 404:
            return None
        raise _refused(exc) from None


def _refused(exc: ClientError) -> UploadFailed:
    return UploadFailed(exc.shown().removeprefix("error: "), EXIT_REFUSED)
