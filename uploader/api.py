"""The control API: Kubernetes-shaped paths for VirtualImage and ClusterVirtualImage."""

from __future__ import annotations

import json
from typing import Any

import yaml
from aiohttp import web

from uploader.errors import BadRequest
from uploader.images import ImageController
from uploader.resources import (
    API_VERSION,
    CLUSTER_VIRTUAL_IMAGE,
    GROUP,
    VERSION,
    VIRTUAL_IMAGE,
    Kind,
)

PREFIX = f"/apis/{GROUP}/{VERSION}"
CONTROLLER = web.AppKey("controller", ImageController)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data) + "\n", content_type="application/json"
    )


async def _read_manifest(request: web.Request) -> Any:
    text = await request.text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadRequest(f"the body is neither JSON nor YAML: {exc}") from None


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

    def _where(self, request: web.Request) -> tuple[ImageController, str | None]:
        namespace = request.match_info.get("namespace") if self.kind.namespaced else None
        return request.app[CONTROLLER], namespace

    async def collection(self, request: web.Request) -> web.StreamResponse:
        controller, namespace = self._where(request)
        if _truthy(request.query.get("watch")):
            name = _name_from_selector(request.query.get("fieldSelector"))
            return await self._watch(request, namespace, name)
        items = controller.list(self.kind, namespace)
        return _json(
            {
                "apiVersion": API_VERSION,
                "kind": self.kind.list_kind,
                "metadata": {"resourceVersion": str(controller.store.version)},
                "items": items,
            }
        )

    async def create(self, request: web.Request) -> web.Response:
        controller, namespace = self._where(request)
        obj = await controller.create(self.kind, namespace, await _read_manifest(request))
        return _json(obj, status=201)

    async def item(self, request: web.Request) -> web.StreamResponse:
        controller, namespace = self._where(request)
        name = request.match_info["name"]
        if _truthy(request.query.get("watch")):
            return await self._watch(request, namespace, name)
        return _json(controller.get(self.kind, namespace, name))

    async def replace(self, request: web.Request) -> web.Response:
        controller, namespace = self._where(request)
        name = request.match_info["name"]
        doc = await _read_manifest(request)
        return _json(await controller.replace(self.kind, namespace, name, doc))

    async def delete(self, request: web.Request) -> web.Response:
        controller, namespace = self._where(request)
        return _json(await controller.delete(self.kind, namespace, request.match_info["name"]))

    async def _watch(
        self, request: web.Request, namespace: str | None, name: str | None
    ) -> web.StreamResponse:
        controller = request.app[CONTROLLER]
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        events = controller.store.watch(self.kind.name, namespace, name)
        try:
            async for event in events:
                await response.write(event.to_json().encode() + b"\n")
        except ConnectionError:
            pass
        finally:
            await events.aclose()
        return response


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
        app.router.add_put(base + "/{name}", handlers.replace)
        app.router.add_delete(base + "/{name}", handlers.delete)
