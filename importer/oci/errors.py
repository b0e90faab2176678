"""The error of every registry operation, and its message built from the registry's answer."""

from __future__ import annotations

import json
import os
import ssl

import aiohttp

from importer.errors import TransferError

_BODY_EXCERPT = 200


class RegistryError(TransferError):
    """A registry request failed; the message says what was attempted and what the registry
    answered, e.g. "pushing the manifest of vi/ns/x: 401 UNAUTHORIZED: authentication
    required"."""

    reason = "ProvisioningFailed"
    http_status = 502

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def describe_error_body(body: bytes) -> tuple[str | None, str]:
    """The first error code and a readable text of a registry's answer: its JSON `errors`
    list when there is one, else a short excerpt of the body."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        document = None
    errors = document.get("errors") if isinstance(document, dict) else None
    if isinstance(errors, list) and errors:
        codes: list[str] = []
        parts: list[str] = []
        for error in errors:
            if not isinstance(error, dict):
                continue
            code = str(error.get("code") or "").strip()
            message = str(error.get("message") or "").strip()
            codes.append(code)
            parts.append(f"{code}: {message}" if code and message else code or message)
        return (codes[0] or None) if codes else None, "; ".join(part for part in parts if part)
    text = body[:_BODY_EXCERPT].decode("utf-8", "replace").strip()
    return None, " ".join(text.split())


def error_from_answer(what: str, status: int, reason: str | None, body: bytes) -> RegistryError:
    code, text = describe_error_body(body)
    message = f"{what}: {status} {text or reason or ''}".rstrip()
    return RegistryError(message, status=status, code=code)


def error_from_exception(what: str, where: str, exc: BaseException) -> RegistryError:
    """A connection-level failure (refused, reset, TLS, timeout) as one readable line."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        detail = f"TLS verification of {where} failed: {_ssl_reason(exc.certificate_error)}"
    elif isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        detail = f"TLS handshake with {where} failed: {_ssl_reason(exc)}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        detail = f"cannot connect to {where}: {_os_reason(exc.os_error)}"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        detail = f"{where} closed the connection"
    elif isinstance(exc, TimeoutError):
        detail = f"{where} did not answer in time"
    elif isinstance(exc, aiohttp.ClientOSError):
        detail = f"connection to {where} failed: {_os_reason(exc)}"
    else:
        detail = f"{where}: {exc}"
    return RegistryError(f"{what}: {detail}")


def _os_reason(exc: OSError) -> str:
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


def _ssl_reason(exc: BaseException) -> str:
    inner = getattr(exc, "os_error", None) or getattr(exc, "certificate_error", None) or exc
    if isinstance(inner, ssl.SSLCertVerificationError) and inner.verify_message:
        return f"certificate verify failed: {inner.verify_message}"
    if isinstance(inner, ssl.SSLError) and inner.reason:
        return str(inner.reason).replace("_", " ").lower()
    return str(inner)
