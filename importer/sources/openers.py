"""Each kind of source as a SourceOpener: what a transfer opens (again, if it starts over).

The server's imports and the importer job open their sources through these. A `guard`
(importer/netguard.py) limits where HTTP and registry sources may connect; the server
passes its own, the importer job none.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from urllib.parse import urlparse

from importer.netguard import AddressGuard
from importer.oci.auth import Credentials
from importer.oci.disklayer import DiskFile
from importer.sources.container_image import open_container_image
from importer.sources.file import file_chunks, source_length
from importer.sources.http import HttpSource
from importer.sources.opened import OpenedSource, SourceOpener


def http_source(
    url: str,
    ca_bundle: bytes | None = None,
    insecure: bool = False,
    guard: AddressGuard | None = None,
) -> SourceOpener:
    @contextlib.asynccontextmanager
    async def opened() -> AsyncIterator[OpenedSource]:
        async with HttpSource(url, ca_bundle, insecure=insecure, guard=guard) as http:
            yield OpenedSource(http, http.length, urlparse(url).path)

    return opened


def disk_file_source(
    open_disk: Callable[[], AbstractAsyncContextManager[DiskFile]],
) -> SourceOpener:
    """The disk file of a containerDisk or DVCR image, as `open_disk` streams it."""

    @contextlib.asynccontextmanager
    async def opened() -> AsyncIterator[OpenedSource]:
        async with open_disk() as disk:
            yield OpenedSource(disk.chunks, disk.size, disk.filename)

    return opened


def container_image_source(
    image: str,
    *,
    credentials: Credentials | None = None,
    ca_bundle: bytes | None = None,
    insecure: bool = False,
    guard: AddressGuard | None = None,
) -> SourceOpener:
    return disk_file_source(
        lambda: open_container_image(
            image, credentials=credentials, ca_bundle=ca_bundle, insecure=insecure, guard=guard
        )
    )


def file_source(path: Path) -> SourceOpener:
    @contextlib.asynccontextmanager
    async def opened() -> AsyncIterator[OpenedSource]:
        yield OpenedSource(file_chunks(path), source_length(path), path.name)

    return opened
