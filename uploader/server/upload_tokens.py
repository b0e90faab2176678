"""Upload tokens: unguessable, bound to one image, looked up in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

TOKEN_BYTES = 32  # 256 bits
_SHOWN = 6
_UPLOAD_PATH = re.compile(r"(/upload/)([A-Za-z0-9_-]+)")


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def redact(token: str) -> str:
    """Enough of a token to tell two apart in a log, never enough to use it."""
    return token[:_SHOWN] + "…"


def redact_path(path: str) -> str:
    return _UPLOAD_PATH.sub(lambda m: m.group(1) + redact(m.group(2)), path)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


ImageKey = tuple[str, str, str]  # kind, namespace ("" for cluster scope), name


@dataclass
class _Entry:
    token: str
    key: ImageKey


class TokenIndex:
    """Maps tokens to images. The dict is keyed by the token's sha256, so the lookup time
    does not depend on how much of a guess matches; the final comparison is constant-time."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, _Entry] = {}
        self._by_key: dict[ImageKey, bytes] = {}

    def add(self, token: str, key: ImageKey) -> None:
        self.remove(key)
        digest = _digest(token)
        self._by_digest[digest] = _Entry(token, key)
        self._by_key[key] = digest

    def remove(self, key: ImageKey) -> None:
        digest = self._by_key.pop(key, None)
        if digest is not None:
            self._by_digest.pop(digest, None)

    def find(self, token: str) -> ImageKey | None:
        entry = self._by_digest.get(_digest(token))
        if entry is None or not hmac.compare_digest(entry.token.encode(), token.encode()):
            return None
        return entry.key


class UploadTokens:
    """The upload URLs' tokens of every image, by what the URL still answers: an image
    that waits for (or takes) its upload, one that is Ready (409, and GET/HEAD still
    answer), and one that failed (410 with the failure).

    Beside them, the length a tus creation request declared for an upload that took no
    byte yet (None: it comes with a later part); it lives as long as the waiting token, in
    memory (a restart forgets it)."""

    def __init__(self) -> None:
        self.waiting = TokenIndex()
        self.ready = TokenIndex()
        self.failed = TokenIndex()
        self._declared: dict[ImageKey, int | None] = {}

    def declare(self, key: ImageKey, length: int | None) -> None:
        self._declared[key] = length

    def declared(self, key: ImageKey) -> int | None:
        return self._declared.get(key)

    def deferred(self, key: ImageKey) -> bool:
        """Whether a creation request said the length comes later."""
        return key in self._declared and self._declared[key] is None

    def undeclare(self, key: ImageKey) -> None:
        self._declared.pop(key, None)

    def wait(self, token: str, key: ImageKey) -> None:
        self.failed.remove(key)
        self.waiting.add(token, key)

    def mark_ready(self, token: str | None, key: ImageKey) -> None:
        self.waiting.remove(key)
        self.undeclare(key)
        if token:
            self.ready.add(token, key)

    def mark_failed(self, token: str | None, key: ImageKey) -> None:
        self.waiting.remove(key)
        self.undeclare(key)
        if token:
            self.failed.add(token, key)

    def forget(self, key: ImageKey) -> None:
        self.waiting.remove(key)
        self.undeclare(key)
        self.ready.remove(key)
        self.failed.remove(key)
