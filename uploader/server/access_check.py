"""The access check of every request to the API and `/metrics` (see uploader/server/access.py).

The middleware authenticates (401) and checks what the path and method ask for (403)
before a handler runs; a handler that learns more from the body (a ClusterVirtualImage
made from a namespaced image) asks `require` again.
"""

from __future__ import annotations

from aiohttp import web

from uploader.errors import Forbidden, Handler, Unauthorized
from uploader.resources import GROUP
from uploader.server.access import AccessControl, ApiToken, Verb

ACCESS = web.AppKey("access", AccessControl)
_CALLER = "api_access.caller"
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_CLUSTER_SEGMENT = "/clustervirtualimages"


def _guarded(path: str) -> bool:
    return path.startswith("/apis/") or path == "/apis" or path == "/metrics"


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise Unauthorized(
            "the API needs a bearer token: send Authorization: Bearer TOKEN "
            "(dvcr-uploader --token, DVCR_TOKEN or DVCR_TOKEN_FILE)"
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be: Bearer TOKEN")
    return token.strip()


def require(request: web.Request, verb: Verb, namespace: str | None, what: str) -> None:
    """Raises 403 unless the caller may `verb` `what` in `namespace` (None: cluster scope)."""
    token: ApiToken | None = request.get(_CALLER)
    if token is None or token.may(verb, namespace):
        return
    action = "read" if verb is Verb.READ else "change"
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    raise Forbidden(
        f'user "{token.user}" ({token.role.name.lower()}) may not {action} {what} {where}'
    )


def require_every_namespace(request: web.Request, what: str) -> None:
    """Raises 403 unless the caller reaches every namespace: a list across namespaces."""
    token: ApiToken | None = request.get(_CALLER)
    if token is None or token.cluster_wide:
        return
    raise Forbidden(
        f'user "{token.user}" may not list {what} across all namespaces: that needs a token '
        'with namespaces: "*"'
    )


def _check_path(request: web.Request, token: ApiToken) -> None:
    verb = Verb.READ if request.method in _READS else Verb.WRITE
    if request.path == "/metrics":
        if not token.cluster_wide:
            raise Forbidden(
                f'user "{token.user}" may not read /metrics: it spans every namespace and '
                'needs a token with namespaces: "*"'
            )
        return
    namespace = request.match_info.get("namespace")
    if namespace is not None:
        require(request, verb, namespace, f"virtualimages.{GROUP}")
    elif _CLUSTER_SEGMENT in request.path:
        require(request, verb, None, f"clustervirtualimages.{GROUP}")


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    access = request.app.get(ACCESS)
    if access is None or access.open or not _guarded(request.path):
        return await handler(request)
    token = access.authenticate(_bearer(request))
    if token is None:
        raise Unauthorized("the bearer token is not known to this server")
    request[_CALLER] = token
    _check_path(request, token)
    return await handler(request)
