"""Errors of the API and their one mapping to HTTP responses.

Handlers raise; the middleware answers with the Kubernetes-shaped Status object
`{"kind":"Status","status":"Failure","reason":...,"message":...,"code":N}`. Transfer
errors from the pipeline (importer.errors) map through the same path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from importer.errors import TransferError
from uploader.quoting import cut

log = logging.getLogger(__name__)


TUS_VERSION = "1.0.0"


def offset_headers(offset: int) -> dict[str, str]:
    """Where an upload continues, as resumable clients (curl -C, tus) read it."""
    return {"Upload-Offset": str(offset), "Tus-Resumable": TUS_VERSION}


class ApiError(Exception):
    """An answer other than success. `offset`: where the upload this request belongs to
    continues, for an error a client can recover from by sending from there."""

    code = 500
    reason = "InternalError"

    def __init__(
        self, message: str, headers: dict[str, str] | None = None, offset: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.headers = {**(offset_headers(offset) if offset is not None else {}), **(headers or {})}


class BadRequest(ApiError):
    code = 400
    reason = "BadRequest"


class Unauthorized(ApiError):
    code = 401
    reason = "Unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="dvcr-uploader"'})


class Forbidden(ApiError):
    code = 403
    reason = "Forbidden"


class NotFound(ApiError):
    code = 404
    reason = "NotFound"


class MethodNotAllowed(ApiError):
    code = 405
    reason = "MethodNotAllowed"


class Conflict(ApiError):
    code = 409
    reason = "Conflict"


class AlreadyExists(ApiError):
    code = 409
    reason = "AlreadyExists"


class RequestTimeout(ApiError):
    code = 408
    reason = "RequestTimeout"


class Gone(ApiError):
    """The upload URL of an image that failed: the answer names the failure's own reason."""

    code = 410
    reason = "Gone"

    def __init__(
        self, message: str, reason: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, headers)
        if reason:
            self.reason = reason


class RangeNotSatisfiable(ApiError):
    code = 416
    reason = "RequestedRangeNotSatisfiable"


class Invalid(ApiError):
    code = 422
    reason = "Invalid"


class TooManyImages(Forbidden):
    """A quota of the server (images per namespace, or in all) is reached."""


class InsufficientStorage(ApiError):
    code = 507
    reason = "InsufficientStorage"


class SpecImmutable(ApiError):
    code = 422
    reason = "SpecImmutable"


class UnsupportedMediaType(ApiError):
    code = 415
    reason = "UnsupportedMediaType"


def status_body(code: int, reason: str, message: str) -> dict[str, object]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }


def status_response(
    code: int, reason: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=code,
        text=json.dumps(status_body(code, reason, message)) + "\n",
        content_type="application/json",
        headers=headers,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return status_response(exc.code, exc.reason, exc.message, exc.headers)
    except TransferError as exc:
        return status_response(exc.http_status, exc.reason, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_exception_status(request, exc)
    except Exception:
        log.exception("internal error in %s %s", request.method, request.rel_url.path)
        return status_response(500, "InternalError", "internal server error; see the server log")


# Headers of aiohttp's own answers that a Status answer keeps (its body and type are new).
_KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


def _http_exception_status(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (no route, wrong method, body too large) as a Status."""
    path = cut(request.rel_url.path)
    if isinstance(exc, web.HTTPNotFound):
        message = f"the server could not find the requested resource: {path}"
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{cut(request.method)} is not allowed on {path}; allowed: {allowed}"
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        message = f"the request body is too large: {exc.text}"
    else:
        message = exc.text or exc.reason
    headers = {k: exc.headers[k] for k in _KEPT_HEADERS if k in exc.headers}
    return status_response(exc.status, exc.reason.replace(" ", ""), message, headers)
