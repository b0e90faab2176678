"""A small client of the control API, for the command line."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from uploader.client.credentials import HOW_TO_GIVE_A_TOKEN, Credentials, describe_tls_error
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
    """Sends the bearer token, when there is one, with every request: it talks to the
    API only, never to upload URLs."""

    def __init__(
        self, server: str, credentials: Credentials | None = None, timeout: float = 60
    ) -> None:
        if not server.startswith(("http://", "https://")):
            raise ClientError(f"the server URL {server!r} is not an http:// or https:// URL")
        self.server = server.rstrip("/")
        self.credentials = credentials or Credentials()
        self.timeout = timeout
        self._ssl = self.credentials.ssl_context() if server.startswith("https://") else None

    def path(self, kind: Kind, namespace: str, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}"
        if kind.namespaced:
            base += f"/namespaces/{_segment(namespace)}/{kind.plural}"
        else:
            base += f"/{kind.plural}"
        return f"{base}/{_segment(name)}" if name else base

    def _open(self, method: str, path: str, body: Any = None, timeout: float | None = None):
        data = json.dumps(body).encode() if body is not None else None
        headers = self.credentials.auth_headers()
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.server + path, data=data, headers=headers)
        request.method = method
        try:
            return urllib.request.urlopen(request, timeout=timeout, context=self._ssl)
        except urllib.error.HTTPError as exc:
            raise self._status_error(exc) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def request(self, method: str, path: str, body: Any = None) -> Object:
        try:
            with self._open(method, path, body, self.timeout) as response:
                return _parse(response.read())
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

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
            path += f"&fieldSelector=metadata.name%3D{_segment(name)}"
        try:
            with self._open("GET", path, timeout=None) as response:
                for line in response:
                    if line.strip():
                        yield _parse(line)
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def _status_error(self, exc: urllib.error.HTTPError) -> ClientError:
        if exc.code == 401:
            # As kubectl says it, then how to put it right; the token itself never shows.
            if self.credentials.token:
                hint = f"the server does not accept the token from {self.credentials.token_source}"
            else:
                hint = HOW_TO_GIVE_A_TOKEN
            return ClientError(
                f"You must be logged in to the server (Unauthorized): {hint}", 401, "Unauthorized"
            )
        try:
            status = json.loads(exc.read())
            return ClientError(status.get("message", str(exc)), exc.code, status.get("reason", ""))
        except (ValueError, OSError, AttributeError, http.client.HTTPException):
            return ClientError(f"the server answered {exc.code} {exc.reason}", exc.code)

    def _unreachable(self, exc: BaseException) -> ClientError:
        reason: Any = getattr(exc, "reason", None) or exc
        tls = describe_tls_error(reason)
        if tls is not None:
            reason = f"TLS: {tls}"
        elif isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror  # "Connection refused", without "[Errno 111]"
        text = " ".join(str(reason).split()) or type(exc).__name__
        return ClientError(f"cannot reach the server at {self.server}: {text}")


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _parse(raw: bytes) -> Object:
    try:
        return json.loads(raw)
    except ValueError:
        raise ClientError(f"the server's answer is not JSON: {raw[:80]!r}") from None
