"""The one client of the control API: the command line, the tests and the benchmarks talk to
the server through it.

Two ways to call: the resource methods (`get`, `create`, ...) answer with the object and raise
`ClientError` for an error Status; `call` answers with the HTTP status and the body as they
came, for a caller that checks the status itself. Waiting for an image (`wait_for_phase`,
`wait_gone`) polls the API until the image gets there or a deadline passes.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Container, Iterator
from types import TracebackType
from typing import IO, Any

from uploader.client.credentials import HOW_TO_GIVE_A_TOKEN, Credentials, describe_tls_error
from uploader.resources import GROUP, VERSION, VIRTUAL_IMAGE, Kind

Object = dict[str, Any]

POLL_INTERVAL = 0.02  # seconds between two looks at an image that is being waited for


class ClientError(Exception):
    """The server answered with an error Status, or could not be reached."""

    def __init__(self, message: str, code: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason

    def shown(self) -> str:
        """The line kubectl prints for it: `Error from server (Reason): ...` for an error
        Status, `error: ...` for the rest (a 401 included, said in words of its own)."""
        if self.code and self.code != 401:
            return f"Error from server ({self.reason or self.code}): {self.message}"
        return f"error: {self.message}"

    @property
    def per_object(self) -> bool:
        """Whether it concerns one object only, so that a command goes on with the next."""
        return bool(self.code) and self.code != 401


class Watch:
    """An open watch: the events the server sends, in order, until it closes the stream."""

    def __init__(
        self, response: IO[bytes], unreachable: Callable[[BaseException], ClientError]
    ) -> None:
        self._response = response
        self._unreachable = unreachable

    def __iter__(self) -> Iterator[Object]:
        try:
            for line in self._response:
                if line.strip():
                    yield _parse(line)
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


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

    def path(self, kind: Kind, namespace: str | None, name: str | None = None) -> str:
        """The path of an image, or of the list; a namespaced kind's list of every
        namespace when `namespace` is None."""
        base = f"/apis/{GROUP}/{VERSION}"
        if kind.namespaced and namespace is not None:
            base += f"/namespaces/{_segment(namespace)}/{kind.plural}"
        else:
            base += f"/{kind.plural}"
        return f"{base}/{_segment(name)}" if name else base

    def _open(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> http.client.HTTPResponse:
        """The response to a request that succeeded; urllib's HTTPError for an error status."""
        data = json.dumps(body).encode() if body is not None else None
        headers = self.credentials.auth_headers()
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.server + path, data=data, headers=headers)
        request.method = method
        try:
            response: http.client.HTTPResponse = urllib.request.urlopen(
                request, timeout=timeout, context=self._ssl
            )
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        return response

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """The HTTP status and the JSON body (None when empty) as the server answered, error
        statuses included; ClientError only when the server cannot be reached."""
        try:
            try:
                with self._open(method, path, body, self.timeout) as response:
                    return response.status, _parse_or_none(response.read())
            except urllib.error.HTTPError as exc:
                with exc:
                    return exc.code, _parse_or_none(exc.read())
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def request(self, method: str, path: str, body: Any = None) -> Object:
        """The object the server answered with; ClientError for an error Status."""
        try:
            try:
                with self._open(method, path, body, self.timeout) as response:
                    return _parse(response.read())
            except urllib.error.HTTPError as exc:
                with exc:
                    raise self._status_error(exc) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def get(self, kind: Kind, namespace: str, name: str) -> Object:
        return self.request("GET", self.path(kind, namespace, name))

    def list(self, kind: Kind, namespace: str | None, label_selector: str | None = None) -> Object:
        """The images of `namespace` (None: of every namespace) that `label_selector`
        (kubectl's syntax) selects."""
        return self.request("GET", self.path(kind, namespace) + _query(label_selector))

    def events(self, kind: Kind, namespace: str | None, name: str) -> Object:
        """The image's recent events, a v1 EventList, oldest first."""
        return self.request("GET", self.path(kind, namespace, name) + "/events")

    def create(self, kind: Kind, namespace: str, obj: Object) -> Object:
        return self.request("POST", self.path(kind, namespace), obj)

    def replace(self, kind: Kind, namespace: str, name: str, obj: Object) -> Object:
        return self.request("PUT", self.path(kind, namespace, name), obj)

    def delete(self, kind: Kind, namespace: str, name: str) -> Object:
        return self.request("DELETE", self.path(kind, namespace, name))

    def open_watch(
        self,
        kind: Kind,
        namespace: str | None,
        name: str | None = None,
        timeout: float | None = None,
        label_selector: str | None = None,
    ) -> Watch:
        """A watch that is open when this returns, so that no later change is missed; events
        come from iterating it. `timeout`: the most seconds to wait for the next event."""
        path = self.path(kind, namespace) + "?watch=true"
        if name:
            path += f"&fieldSelector=metadata.name%3D{_segment(name)}"
        if label_selector:
            path += f"&labelSelector={_segment(label_selector)}"
        try:
            return Watch(self._open("GET", path, timeout=timeout), self._unreachable)
        except urllib.error.HTTPError as exc:
            with exc:
                raise self._status_error(exc) from None

    def watch(
        self,
        kind: Kind,
        namespace: str | None,
        name: str | None = None,
        label_selector: str | None = None,
    ) -> Iterator[Object]:
        """Events as the server sends them, until it closes the stream."""
        with self.open_watch(kind, namespace, name, label_selector=label_selector) as events:
            yield from events

    def wait_for(
        self,
        name: str,
        done: Callable[[Object], bool],
        what: str,
        timeout: float = 60,
        namespace: str = "default",
        kind: Kind = VIRTUAL_IMAGE,
    ) -> Object:
        """The image as soon as `done` holds for it; ClientError when `timeout` seconds pass
        first, saying which `what` it did not reach and its status."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.get(kind, namespace, name)
            if done(obj):
                return obj
            if time.monotonic() > deadline:
                raise ClientError(
                    f"{kind.name} {namespace}/{name} did not get to {what} in {timeout:g}s: "
                    f"{obj.get('status')}"
                )
            time.sleep(POLL_INTERVAL)

    def wait_for_phase(
        self,
        name: str,
        phases: Container[str],
        timeout: float = 60,
        namespace: str = "default",
        kind: Kind = VIRTUAL_IMAGE,
    ) -> Object:
        """The image as soon as its phase is one of `phases`."""
        return self.wait_for(
            name,
            lambda obj: phase(obj) in phases,
            f"phase {phases}",
            timeout,
            namespace,
            kind,
        )

    def wait_gone(
        self,
        name: str,
        timeout: float = 60,
        namespace: str = "default",
        kind: Kind = VIRTUAL_IMAGE,
    ) -> None:
        """Returns once the image is deleted (the API answers NotFound)."""
        deadline = time.monotonic() + timeout
        while True:
            code, obj = self.call("GET", self.path(kind, namespace, name))
            if code == 404:
                return
            if time.monotonic() > deadline:
                status = obj.get("status") if isinstance(obj, dict) else obj
                raise ClientError(f"{kind.name} {namespace}/{name} is still there: {status}")
            time.sleep(POLL_INTERVAL)

    def upload_url(
        self, name: str, timeout: float = 60, namespace: str = "default", kind: Kind = VIRTUAL_IMAGE
    ) -> str:
        """The external upload URL of an image fed by upload, once it waits for the upload."""
        obj = self.wait_for(
            name,
            lambda obj: phase(obj) == "WaitForUserUpload" and bool(_upload_urls(obj)),
            "WaitForUserUpload with upload URLs",
            timeout,
            namespace,
            kind,
        )
        return str(_upload_urls(obj)["external"])

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


def phase(obj: Object) -> str | None:
    """An image's phase; None before the server has given it a status."""
    status = obj.get("status")
    return status.get("phase") if isinstance(status, dict) else None


def _upload_urls(obj: Object) -> dict[str, Any]:
    status = obj.get("status")
    urls = status.get("imageUploadURLs") if isinstance(status, dict) else None
    return urls if isinstance(urls, dict) else {}


def _query(label_selector: str | None) -> str:
    return f"?labelSelector={_segment(label_selector)}" if label_selector else ""


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _parse(raw: bytes) -> Object:
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise ClientError(f"the server's answer is not JSON: {raw[:80]!r}") from None
    if not isinstance(parsed, dict):
        raise ClientError(f"the server's answer is not a JSON object: {raw[:80]!r}")
    return parsed


def _parse_or_none(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ClientError(f"the server's answer is not JSON: {raw[:80]!r}") from None
