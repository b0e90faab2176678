"""Who may use the control API (README: "Access, and what the server refuses").

The API is open only while every listener is on loopback and no token file is given: then
only this machine reaches it. Otherwise each request under `/apis/` and `/metrics` carries
`Authorization: Bearer TOKEN`. Tokens come from `--api-token-file` (YAML, re-read on
SIGHUP) or, without one, from `DATA_DIR/admin.token`, written once with a new admin token.

Roles: `view` reads (get, list, watch); `edit` also creates, replaces and deletes
VirtualImages; `admin` does everything, ClusterVirtualImages included. A token's
`namespaces` bounds the VirtualImages it reaches; ClusterVirtualImages are readable by
every token (they are shared by design), and `/metrics`, which spans every namespace, needs
a token with `namespaces: "*"`. Upload URLs are not guarded here: each needs only its own
upload token.

Presented tokens are hashed and compared with every known digest in constant time, so
neither timing nor the order of the file tells how much of a guess matched.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"
ALL_NAMESPACES = "*"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_MAX_TOKEN_FILE = 1 << 20


class AccessConfigError(Exception):
    """A token file that cannot be used; the message says what to fix."""


class Role(enum.IntEnum):
    VIEW = 1
    EDIT = 2
    ADMIN = 3


class Verb(enum.Enum):
    READ = "get"
    WRITE = "modify"


@dataclass(frozen=True)
class ApiToken:
    user: str
    digest: bytes  # sha256 of the token
    role: Role
    namespaces: frozenset[str] | None  # None: every namespace

    def reaches(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces

    def may(self, verb: Verb, namespace: str | None) -> bool:
        """`namespace` None: a cluster-scoped resource."""
        needed = Role.VIEW if verb is Verb.READ else Role.EDIT
        if namespace is None:
            return verb is Verb.READ or self.role is Role.ADMIN
        return self.role >= needed and self.reaches(namespace)

    @property
    def cluster_wide(self) -> bool:
        return self.namespaces is None


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _entry(raw: Any, index: int) -> ApiToken:
    where = f"tokens[{index}]"
    if not isinstance(raw, dict):
        raise AccessConfigError(f"{where} must be a mapping with user, token and role")
    unknown = set(raw) - {"user", "token", "tokenSha256", "role", "namespaces"}
    if unknown:
        raise AccessConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    user = raw.get("user")
    if not isinstance(user, str) or not user:
        raise AccessConfigError(f"{where}.user must be a non-empty string")
    token, hashed = raw.get("token"), raw.get("tokenSha256")
    if (token is None) == (hashed is None):
        raise AccessConfigError(f"{where} ({user}) needs exactly one of token and tokenSha256")
    if token is not None:
        if not isinstance(token, str) or len(token) < 16:
            raise AccessConfigError(
                f"{where}.token ({user}) must be a string of 16 characters or more"
            )
        digest = token_digest(token)
    else:
        if not isinstance(hashed, str) or not _HEX64.match(hashed):
            raise AccessConfigError(f"{where}.tokenSha256 ({user}) must be 64 hex digits")
        digest = bytes.fromhex(hashed)
    role_name = raw.get("role")
    try:
        role = Role[str(role_name).upper()] if isinstance(role_name, str) else None
    except KeyError:
        role = None
    if role is None:
        raise AccessConfigError(f"{where}.role ({user}) must be view, edit or admin")
    namespaces = raw.get("namespaces", [])
    if namespaces == ALL_NAMESPACES:
        reach = None
    elif isinstance(namespaces, list) and all(isinstance(n, str) and n for n in namespaces):
        reach = frozenset(namespaces)
    else:
        raise AccessConfigError(f'{where}.namespaces ({user}) must be a list of namespaces or "*"')
    return ApiToken(user, digest, role, reach)


def load_token_file(path: Path) -> list[ApiToken]:
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_TOKEN_FILE + 1)
    except OSError as exc:
        raise AccessConfigError(f"cannot read the token file {path}: {exc.strerror}") from None
    if len(data) > _MAX_TOKEN_FILE:
        raise AccessConfigError(f"the token file {path} is larger than 1 MiB")
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise AccessConfigError(f"the token file {path} is not YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
        raise AccessConfigError(f"the token file {path} needs a list `tokens:`")
    tokens = [_entry(raw, i) for i, raw in enumerate(doc["tokens"])]
    digests = [t.digest for t in tokens]
    if len(set(digests)) != len(digests):
        raise AccessConfigError(f"the token file {path} names one token twice")
    return tokens


def admin_token(data_dir: Path) -> str:
    """The token of `DATA_DIR/admin.token`, written (mode 0600) when it is not there yet."""
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
        file.flush()
        os.fsync(file.fileno())
    return token


class AccessControl:
    """The tokens the server knows, or none while it is open."""

    def __init__(self, tokens: list[ApiToken] | None, token_file: Path | None = None) -> None:
        self._tokens = tokens  # None: open
        self.token_file = token_file

    @classmethod
    def for_server(
        cls, token_file: Path | None, data_dir: Path, loopback_only: bool
    ) -> AccessControl:
        if token_file is not None:
            return cls(load_token_file(token_file), token_file)
        if loopback_only:
            return cls(None)
        path = data_dir / ADMIN_TOKEN_FILE
        token = admin_token(data_dir)
        log.info(
            "the API needs a bearer token; an admin token is in %s "
            "(DVCR_TOKEN_FILE=%s dvcr-uploader get vi)",
            path.resolve(),
            path.resolve(),
        )
        return cls([ApiToken("admin", token_digest(token), Role.ADMIN, None)])

    @property
    def open(self) -> bool:
        return self._tokens is None

    def reload(self) -> None:
        """SIGHUP: reads the token file again; a file that cannot be used keeps the old
        tokens (and says why in the log)."""
        if self.token_file is None:
            return
        try:
            self._tokens = load_token_file(self.token_file)
        except AccessConfigError as exc:
            log.error("kept the previous tokens: %s", exc)
            return
        log.info("read %d tokens from %s", len(self._tokens), self.token_file)

    def authenticate(self, presented: str) -> ApiToken | None:
        digest = token_digest(presented)
        found = None
        for token in self._tokens or ():
            if hmac.compare_digest(token.digest, digest):
                found = token
        return found
