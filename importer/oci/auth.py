"""Registry credentials, and reading them from a dockerconfigjson (`~/.docker/config.json`,
a Kubernetes `kubernetes.io/dockerconfigjson` secret, or the older `.dockercfg`)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from importer.oci.errors import RegistryError

_DOCKER_HUB_NAMES = {"docker.io", "index.docker.io", "registry-1.docker.io"}


@dataclass(frozen=True)
class Credentials:
    """A username and password, or an identity (refresh) token; secrets stay out of repr."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    @property
    def basic_header(self) -> str | None:
        """The `Authorization` value for basic auth, or None without a username/password."""
        if not self.username and not self.password:
            return None
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    @classmethod
    def from_docker_config(
        cls, path_or_json: str | bytes | os.PathLike[str], registry_host: str
    ) -> Credentials | None:
        """The entry for `registry_host` (host or host:port; a URL is accepted), or None
        when the file has none. `path_or_json` is a file path or the JSON text itself."""
        document = _load(path_or_json)
        auths = document.get("auths", document)
        if not isinstance(auths, dict):
            raise RegistryError("reading registry credentials: `auths` is not an object")
        wanted = _host_key(registry_host)
        for key, entry in auths.items():
            if _host_key(key) == wanted and isinstance(entry, dict):
                return _entry_credentials(key, entry)
        return None


def _load(path_or_json: str | bytes | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(path_or_json, bytes):
        text = path_or_json.decode("utf-8", "replace")
    elif isinstance(path_or_json, str) and path_or_json.lstrip().startswith("{"):
        text = path_or_json
    else:
        try:
            text = Path(path_or_json).read_text()
        except OSError as exc:
            what = f"reading registry credentials from {path_or_json}"
            raise RegistryError(f"{what}: {exc.strerror}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise RegistryError(f"reading registry credentials: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise RegistryError("reading registry credentials: the JSON is not an object")
    return document


def _host_key(name: str) -> str:
    """`https://Host:5000/v1/` -> `host:5000`; all of Docker Hub's names are one."""
    host = name.strip().lower()
    for scheme in ("https://", "http://"):
        if host.startswith(scheme):
            host = host[len(scheme) :]
    host = host.split("/", 1)[0]
    return "docker.io" if host in _DOCKER_HUB_NAMES else host


def _entry_credentials(key: str, entry: dict[str, Any]) -> Credentials:
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    encoded = entry.get("auth")
    if encoded:
        try:
            decoded = base64.b64decode(str(encoded), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryError(
                f"reading registry credentials for {key}: `auth` is not base64 of user:password"
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise RegistryError(
                f"reading registry credentials for {key}: `auth` is not base64 of user:password"
            )
    return Credentials(
        username=username,
        password=password,
        identity_token=str(entry.get("identitytoken") or ""),
    )
