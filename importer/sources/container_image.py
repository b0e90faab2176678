"""A containerDisk image in a registry as an import source.

`async with open_container_image("reg:5000/images/ubuntu:22.04") as disk:` gives the one
file under `disk/` of the image, streamed out of its layer (see importer/oci/disklayer.py):
`disk.filename`, `disk.size`, and `disk.chunks`, which checks the layer's digest before it
ends. The registry is reached by the rule of importer/oci/endpoint.py (HTTPS; plain HTTP
only for a loopback or insecure registry, or when the image is written `http://host/...`).

Errors: whatever keeps the image from being read (connection, TLS, 401/403, a missing tag
or manifest, an address the `guard` refuses) is SourceUnreachable, with the registry's
answer in the message; an image that is not a containerDisk, or is corrupt, is InvalidImage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from importer.errors import SourceUnreachable
from importer.netguard import AddressGuard
from importer.oci.auth import Credentials
from importer.oci.disklayer import DiskFile
from importer.oci.errors import RegistryError
from importer.oci.pull import DEFAULT_PLATFORM, Platform, open_registry_disk
from importer.oci.reference import InvalidReference, Reference
from importer.oci.registry import RegistryClient

__all__ = ["DiskFile", "open_container_image", "parse_image"]


def parse_image(image: str) -> tuple[Reference, str]:
    """The reference and the registry endpoint to connect to (`host[:port]`, or with the
    scheme when the image was written `http://...` or `https://...`)."""
    text = image.strip().removeprefix("docker://")
    scheme = ""
    for prefix in ("http://", "https://"):
        if text.lower().startswith(prefix):
            scheme, text = prefix, text[len(prefix) :]
    try:
        reference = Reference.parse(text)
    except InvalidReference as exc:
        raise SourceUnreachable(f"{image!r} is not an image reference: {exc}") from None
    return reference, f"{scheme}{reference.endpoint_host}"


def open_container_image(
    image: str,
    *,
    credentials: Credentials | None = None,
    ca_bundle: bytes | None = None,
    insecure: bool = False,
    platform: str = DEFAULT_PLATFORM,
    guard: AddressGuard | None = None,
) -> AbstractAsyncContextManager[DiskFile]:
    """The disk file of a containerDisk image (`host[:port]/repo:tag`, `...@sha256:...`);
    `platform` picks the manifest of an index or manifest list; `guard` limits where the
    registry client connects (token servers and blob redirects included)."""
    return _open(image, credentials, ca_bundle, insecure, platform, guard)


@asynccontextmanager
async def _open(
    image: str,
    credentials: Credentials | None,
    ca_bundle: bytes | None,
    insecure: bool,
    platform: str,
    guard: AddressGuard | None,
) -> AsyncIterator[DiskFile]:
    reference, endpoint = parse_image(image)
    wanted = Platform.parse(platform)
    try:
        client = RegistryClient(
            endpoint, credentials=credentials, ca_bundle=ca_bundle, insecure=insecure, guard=guard
        )
    except RegistryError as exc:
        raise SourceUnreachable(f"pulling {image}: {exc.message}") from None
    try:
        async with open_registry_disk(
            client, reference.repository, reference.reference, wanted, what=str(reference)
        ) as disk:
            yield disk
    finally:
        await client.close()
