"""A small client of the control API, for the command line."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from uploader.resources import GROUP, VERSION, Kind

Object = dict[str, Any]


class ClientError(Exception):
    """The server answered with an error Status, or could not be reached."""

    def __init__(self, message: str, code: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason


class ApiClient:
    def __init__(self, server: str, timeout: float = 60) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout

    def path(self, kind: Kind, namespace: str, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}"
        base += f"/namespaces/{namespace}/{kind.plural}" if kind.namespaced else f"/{kind.plural}"
        return f"{base}/{name}" if name else base

    def _open(self, method: str, path: str, body: Any = None, timeout: float | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise _status_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach the server at {self.server}: {reason}") from None

    def request(self, method: str, path: str, body: Any = None) -> Object:
        with self._open(method, path, body, self.timeout) as response:
            return json.loads(response.read())

    def get(self, kind: Kind, namespace: str, name: str) -> Object:
        return self.request("GET", self.path(kind, namespace, name))

    def list(self, kind: Kind, namespace: str) -> Object:
        return self.request("GET", self.path(kind, namespace))

    def create(self, kind: Kind, namespace: str, obj: Object) -> Object:
        return self.request("POST", self.path(kind, namespace), obj)

    def replace(self, kind: Kind, namespace: str, name: str, obj: Object) -> Object:
        return self.request("PUT", self.path(kind, namespace, name), obj)

    def delete(self, kind: Kind, namespace: str, name: str) -> Object:
        return self.request("DELETE", self.path(kind, namespace, name))

    def watch(self, kind: Kind, namespace: str, name: str | None = None) -> Iterator[Object]:
        """Events as the server sends them, until it closes the stream."""
        path = self.path(kind, namespace) + "?watch=true"
        if name:
            path += f"&fieldSelector=metadata.name%3D{name}"
        with self._open("GET", path, timeout=None) as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)


def _status_error(exc: urllib.error.HTTPError) -> ClientError:
    try:
        status = json.loads(exc.read())
        return ClientError(status.get("message", str(exc)), exc.code, status.get("reason", ""))
    except (ValueError, OSError):
        return ClientError(f"the server answered {exc.code} {exc.reason}", exc.code)
