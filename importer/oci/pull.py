"""From an image reference to the layers to read: manifests, indexes and platforms.

An OCI image manifest or a Docker schema 2 manifest names the layers. An OCI image index
or a Docker manifest list names one manifest per platform: the one of the wanted platform
(`os/architecture[/variant]`, `linux/amd64` by default) is taken, and when there is none
the error lists the platforms the image has.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from importer.errors import InvalidImage, SourceUnreachable
from importer.oci.disklayer import DiskFile, IteratorSource, disk_from_layers
from importer.oci.errors import RegistryError
from importer.oci.image import Descriptor
from importer.oci.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
)

DEFAULT_PLATFORM = "linux/amd64"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
_INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
_MAX_NESTING = 3
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm"}
_DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7"}

# (reference) -> (manifest bytes, media type as served; "" when unknown)
ManifestGetter = Callable[[str], Awaitable[tuple[bytes, str]]]


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"{text!r} is not a platform (os/architecture[/variant])")
        architecture = _ARCH_ALIASES.get(parts[1], parts[1])
        return cls(parts[0], architecture, parts[2] if len(parts) == 3 else "")

    @classmethod
    def of_entry(cls, entry: dict[str, Any]) -> Platform | None:
        platform = entry.get("platform")
        if not isinstance(platform, dict):
            return None
        os_name = str(platform.get("os") or "").lower()
        architecture = str(platform.get("architecture") or "").lower()
        if not os_name or not architecture:
            return None
        architecture = _ARCH_ALIASES.get(architecture, architecture)
        return cls(os_name, architecture, str(platform.get("variant") or "").lower())

    def _variant_or_default(self) -> str:
        return self.variant or _DEFAULT_VARIANTS.get(self.architecture, "")

    def matches(self, other: Platform) -> bool:
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or self._variant_or_default() == other._variant_or_default()

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


def _document(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidImage(f"{what}: the manifest is not JSON") from None
    if not isinstance(document, dict):
        raise InvalidImage(f"{what}: the manifest is not a JSON object")
    return document


def _kind(document: dict[str, Any], served_type: str) -> str:
    if served_type in (*_INDEX_TYPES, *_MANIFEST_TYPES, *DOCKER_SCHEMA1):
        return served_type
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if "manifests" in document:
        return OCI_INDEX
    if "layers" in document:
        return OCI_MANIFEST
    if document.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    return served_type or "unknown"


def _descriptor(entry: Any, what: str) -> Descriptor:
    if not isinstance(entry, dict):
        raise InvalidImage(f"{what}: a descriptor is not an object")
    media_type = entry.get("mediaType")
    digest = entry.get("digest")
    size = entry.get("size")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidImage(f"{what}: a descriptor has an unsupported digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidImage(f"{what}: the descriptor of {digest} has no valid size")
    return Descriptor(str(media_type or ""), digest, size)


def _pick_platform(document: dict[str, Any], wanted: Platform, what: str) -> Descriptor:
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise InvalidImage(f"{what}: the index has no list of manifests")
    available: list[str] = []
    matching: list[tuple[Platform, dict[str, Any]]] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        platform = Platform.of_entry(entry)
        if platform is None or platform.os == "unknown":  # e.g. attestations
            continue
        available.append(str(platform))
        if wanted.matches(platform):
            matching.append((platform, entry))
    if not matching:
        has = ", ".join(dict.fromkeys(available)) or "none"
        raise InvalidImage(f"{what}: the image has no manifest for {wanted}; it has: {has}")
    exact = [entry for platform, entry in matching if platform.variant == wanted.variant]
    return _descriptor((exact or [entry for _, entry in matching])[0], what)


async def image_layers(
    get_manifest: ManifestGetter, reference: str, platform: Platform, what: str
) -> list[Descriptor]:
    """The layers (bottom first) of the image `reference` names, for `platform`."""
    body, served_type = await get_manifest(reference)
    for _ in range(_MAX_NESTING):
        document = _document(body, what)
        kind = _kind(document, served_type)
        if kind in _INDEX_TYPES:
            chosen = _pick_platform(document, platform, what)
            body, served_type = await get_manifest(chosen.digest)
            continue
        if kind in _MANIFEST_TYPES:
            layers = document.get("layers")
            if not isinstance(layers, list):
                raise InvalidImage(f"{what}: the manifest has no list of layers")
            return [_descriptor(layer, what) for layer in layers]
        if kind in DOCKER_SCHEMA1:
            raise InvalidImage(f"{what}: Docker schema 1 manifests are not supported")
        raise InvalidImage(f"{what}: the manifest's media type {kind!r} is not an image's")
    raise InvalidImage(f"{what}: the image's indexes are nested too deeply")


async def _blob_chunks(client: RegistryClient, repo: str, digest: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in client.get_blob(repo, digest):
            yield chunk
    except RegistryError as exc:
        raise SourceUnreachable(exc.message) from None


def registry_manifest_getter(client: RegistryClient, repo: str) -> ManifestGetter:
    """Manifests from a registry; every failure to get one is SourceUnreachable."""

    async def get(reference: str) -> tuple[bytes, str]:
        try:
            body, media_type, _ = await client.get_manifest(repo, reference)
        except RegistryError as exc:
            raise SourceUnreachable(exc.message) from None
        return body, media_type

    return get


@asynccontextmanager
async def open_registry_disk(
    client: RegistryClient,
    repo: str,
    reference: str,
    platform: Platform | str = DEFAULT_PLATFORM,
    what: str | None = None,
) -> AsyncIterator[DiskFile]:
    """The disk file of the image `repo:reference` (tag or digest) in the client's
    registry, streamed from its blobs. Registry failures are SourceUnreachable."""
    wanted = platform if isinstance(platform, Platform) else Platform.parse(platform)
    what = what or f"{repo}:{reference}"
    layers = await image_layers(registry_manifest_getter(client, repo), reference, wanted, what)
    loop = asyncio.get_running_loop()

    def open_blob(layer: Descriptor) -> IteratorSource:
        return IteratorSource(_blob_chunks(client, repo, layer.digest), loop)

    async with disk_from_layers(layers, open_blob) as disk:
        yield disk
