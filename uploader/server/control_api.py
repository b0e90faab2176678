"""The control API: Kubernetes-shaped paths for VirtualImage and ClusterVirtualImage.

Lists and watches take `?labelSelector=` (uploader/server/label_selector.py); VirtualImages
of every namespace are listed at `.../virtualimages`, as in Kubernetes; an image's events
are a v1 EventList at `.../{name}/events`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from uploader.errors import ApiError, BadRequest, NotFound
from uploader.quoting import cut
from uploader.resources import (
    API_VERSION,
    CLUSTER_VIRTUAL_IMAGE,
    GROUP,
    VERSION,
    VIRTUAL_IMAGE,
    Kind,
    validate_name,
    validate_namespace,
)
from uploader.server.access import Verb
from uploader.server.access_check import require, require_every_namespace
from uploader.server.image_db import Event, Object
from uploader.server.label_selector import LabelSelector, parse_label_selector
from uploader.server.lifecycle import ImageLifecycle
from uploader.server.manifests import parse_manifest

PREFIX = f"/apis/{GROUP}/{VERSION}"
IMAGES = web.AppKey("images", ImageLifecycle)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data) + "\n", content_type="application/json"
    )


async def _read_manifest(request: web.Request) -> Any:
    return await parse_manifest(await request.read(), request.content_type)


def _require_source_access(request: web.Request, kind: Kind, doc: Any) -> None:
    """A ClusterVirtualImage made from a namespaced image or disk copies it out of its
    namespace: its maker must be able to read that namespace."""
    if kind is not CLUSTER_VIRTUAL_IMAGE:
        return
    source = doc.get("spec", {}).get("dataSource", {}) if isinstance(doc, dict) else {}
    ref = source.get("objectRef") if isinstance(source, dict) else None
    if not isinstance(ref, dict):
        return
    namespace = ref.get("namespace")
    if isinstance(namespace, str):
        require(request, Verb.READ, namespace, f"the source {ref.get('kind')} {ref.get('name')}")


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _name_from_selector(selector: str | None) -> str | None:
    """`metadata.name=foo` (the only field selector kubectl sends for `get NAME -w`)."""
    if not selector:
        return None
    field, sep, value = selector.partition("=")
    if field != "metadata.name" or not sep:
        raise BadRequest(f'field selector "{selector}" is not supported; use metadata.name=NAME')
    return value.lstrip("=")


class ResourceHandlers:
    def __init__(self, kind: Kind) -> None:
        self.kind = kind

    def _where(self, request: web.Request) -> tuple[ImageLifecycle, str | None]:
        namespace = request.match_info.get("namespace") if self.kind.namespaced else None
        if namespace is not None:
            validate_namespace(namespace)
        return request.app[IMAGES], namespace

    def _name(self, request: web.Request) -> str:
        """The name in the path. One that no new image may have is not found, unless an
        image made before today's limits has it (so it can still be read and deleted)."""
        name = request.match_info["name"]
        try:
            return validate_name(name)
        except ApiError:
            images, namespace = self._where(request)
            if not images.exists(self.kind, namespace, name):
                raise NotFound(f'{self.kind.display} "{cut(name)}" not found') from None
            return name

    async def collection(self, request: web.Request) -> web.StreamResponse:
        images, namespace = self._where(request)
        if self.kind.namespaced and namespace is None:
            require_every_namespace(request, f"{self.kind.plural}.{GROUP}")
        selector = parse_label_selector(request.query.get("labelSelector"))
        if _truthy(request.query.get("watch")):
            name = _name_from_selector(request.query.get("fieldSelector"))
            return await self._watch(request, namespace, name, selector)
        items = [
            obj
            for obj in images.list(self.kind, namespace)
            if selector.matches(obj["metadata"].get("labels"))
        ]
        return _json(
            {
                "apiVersion": API_VERSION,
                "kind": self.kind.list_kind,
                "metadata": {"resourceVersion": str(images.version)},
                "items": items,
            }
        )

    async def create(self, request: web.Request) -> web.Response:
        images, namespace = self._where(request)
        doc = await _read_manifest(request)
        _require_source_access(request, self.kind, doc)
        obj = await images.create(self.kind, namespace, doc)
        return _json(obj, status=201)

    async def item(self, request: web.Request) -> web.StreamResponse:
        images, namespace = self._where(request)
        name = self._name(request)
        if _truthy(request.query.get("watch")):
            return await self._watch(request, namespace, name, LabelSelector())
        return _json(images.get(self.kind, namespace, name))

    async def events(self, request: web.Request) -> web.Response:
        """The image's recent events, a v1 EventList, oldest first."""
        images, namespace = self._where(request)
        image = images.get(self.kind, namespace, self._name(request))
        return _json(images.store.events.event_list(image))

    async def replace(self, request: web.Request) -> web.Response:
        images, namespace = self._where(request)
        name = self._name(request)
        doc = await _read_manifest(request)
        _require_source_access(request, self.kind, doc)
        return _json(await images.replace(self.kind, namespace, name, doc))

    async def delete(self, request: web.Request) -> web.Response:
        images, namespace = self._where(request)
        return _json(await images.delete(self.kind, namespace, self._name(request)))

    async def _watch(
        self,
        request: web.Request,
        namespace: str | None,
        name: str | None,
        selector: LabelSelector,
    ) -> web.StreamResponse:
        images = request.app[IMAGES]
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        events = images.watch(self.kind, namespace, name)
        matching: set[tuple[str, str]] = set()
        try:
            async for event in events:
                shown = _selected(event, selector, matching)
                if shown is not None:
                    await response.write(shown.to_json().encode() + b"\n")
        except ConnectionError:
            pass
        finally:
            await events.aclose()
        return response


def _selected(
    event: Event, selector: LabelSelector, matching: set[tuple[str, str]]
) -> Event | None:
    """The event a watch with `selector` sends: an image whose labels stop matching is
    DELETED for it, as in Kubernetes; `matching` holds the images it has seen match."""
    meta: Object = event.object["metadata"]
    key = (str(meta.get("namespace", "")), str(meta["name"]))
    if event.type != "DELETED" and selector.matches(meta.get("labels")):
        matching.add(key)
        return event
    if key in matching:
        matching.discard(key)
        return Event("DELETED", event.object)
    return None


def add_routes(app: web.Application) -> None:
    for kind in (VIRTUAL_IMAGE, CLUSTER_VIRTUAL_IMAGE):
        handlers = ResourceHandlers(kind)
        base = (
            f"{PREFIX}/namespaces/{{namespace}}/{kind.plural}"
            if kind.namespaced
            else (f"{PREFIX}/{kind.plural}")
        )
        app.router.add_get(base, handlers.collection)
        app.router.add_post(base, handlers.create)
        app.router.add_get(base + "/{name}", handlers.item)
        app.router.add_get(base + "/{name}/events", handlers.events)
        app.router.add_put(base + "/{name}", handlers.replace)
        app.router.add_delete(base + "/{name}", handlers.delete)
        if kind.namespaced:  # every namespace's images, as Kubernetes lists them
            app.router.add_get(f"{PREFIX}/{kind.plural}", handlers.collection)
