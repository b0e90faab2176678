"""Image references: `host:port/repo:tag`, `host/repo@sha256:...`, `ubuntu` (Docker Hub)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from importer.oci.errors import RegistryError

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")


class InvalidReference(RegistryError, ValueError):
    pass


@dataclass(frozen=True)
class Reference:
    registry: str  # host or host:port, as written (docker.io for Docker Hub)
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        remainder = text.strip()
        digest = None
        if "@" in remainder:
            remainder, digest = remainder.split("@", 1)
            if not DIGEST.fullmatch(digest):
                raise InvalidReference(f"{text!r}: {digest!r} is not a digest")
        tag = None
        last_slash = remainder.rfind("/")
        colon = remainder.rfind(":")
        if colon > last_slash:
            remainder, tag = remainder[:colon], remainder[colon + 1 :]
            if not TAG.fullmatch(tag):
                raise InvalidReference(f"{text!r}: {tag!r} is not a tag")
        first, _, rest = remainder.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
        else:
            registry, repository = DOCKER_HUB, remainder
        if registry in (DOCKER_HUB, "index.docker.io") and "/" not in repository:
            repository = f"library/{repository}"
        if not REPOSITORY.fullmatch(repository):
            raise InvalidReference(f"{text!r}: {repository!r} is not a repository name")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry=registry, repository=repository, tag=tag, digest=digest)

    @property
    def reference(self) -> str:
        """What goes into `/v2/<repo>/manifests/<reference>`: the digest when pinned."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def endpoint_host(self) -> str:
        """The host:port to connect to; Docker Hub's API lives on another name."""
        if self.registry in (DOCKER_HUB, "index.docker.io"):
            return DOCKER_HUB_ENDPOINT
        return self.registry

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def check_repository(repository: str) -> str:
    """The name unchanged if it is a valid repository path (it goes into URLs as is)."""
    if not REPOSITORY.fullmatch(repository):
        raise InvalidReference(f"{repository!r} is not a repository name")
    return repository
