"""The two ends of an importer job: where the image comes from, where it goes.

Sources (`IMPORTER_SOURCE`): `http` (a URL), `registry` (a containerDisk image,
`[docker://]host/repo:tag`), `dvcr` (an image in DVCR: the same, or `oci:DIR:repo:tag` for
an OCI layout directory), `filesystem` and `blockDevice` (a path).

Destinations (`IMPORTER_DESTINATION_ENDPOINT`): a path is a PVC (a directory gets
`disk.img`; an existing file or block device is written in place); `host[:port]/repo:tag`
is a DVCR in a registry (a name without a scheme is tried over HTTPS first, see
importer/oci/endpoint.py); `oci:DIR:repo:tag` is an OCI layout directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from importer.errors import TransferError
from importer.formats.base import Limits
from importer.oci.auth import Credentials
from importer.oci.layout import OciLayout
from importer.oci.reference import Reference
from importer.oci.registry import connect_registry
from importer.oci.registry_store import RegistryStore
from importer.pipeline import Sink
from importer.sinks.factory import ClaimLocation, DvcrLocation, SinkFactory
from importer.sources.opened import OpenedSource, SourceOpener
from importer.sources.openers import (
    container_image_source,
    disk_file_source,
    file_source,
    http_source,
)


class EndpointError(TransferError):
    """The job's configuration names an endpoint that cannot be used."""


@dataclass
class RegistrySettings:
    auth_config: str | None
    ca_bundle: bytes | None
    insecure: bool


def _credentials(auth_config: str | None, host: str) -> Credentials | None:
    return Credentials.from_docker_config(auth_config, host) if auth_config else None


def _split_oci(text: str) -> tuple[Path, str, str]:
    """`oci:DIR:repo:tag` -> (DIR, repo, tag)."""
    body = text.removeprefix("oci:")
    directory, _, ref = body.partition(":")
    repo, _, tag = ref.rpartition(":")
    if not directory or not repo or not tag:
        raise EndpointError(f"{text!r} is not oci:DIRECTORY:REPOSITORY:TAG")
    return Path(directory), repo, tag


def source_opener(kind: str, endpoint: str, settings: RegistrySettings) -> SourceOpener:
    if kind == "http":
        return http_source(endpoint, settings.ca_bundle, settings.insecure)
    if kind == "dvcr" and endpoint.startswith("oci:"):
        directory, repo, tag = _split_oci(endpoint)
        return disk_file_source(lambda: OciLayout(directory).open_disk(repo, tag))
    if kind in ("registry", "dvcr"):
        image = endpoint.removeprefix("docker://")
        return container_image_source(
            image,
            credentials=_credentials(settings.auth_config, Reference.parse(image).endpoint_host),
            ca_bundle=settings.ca_bundle,
            insecure=settings.insecure,
        )
    return file_source(Path(endpoint))


class Destination:
    """Opens a sink per attempt; `close` ends what the destination holds (a connection)."""

    def __init__(self, endpoint: str, settings: RegistrySettings, limits: Limits) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.limits = limits
        self._sinks = SinkFactory(limits)
        self._dvcr_image: DvcrLocation | None = None  # connected on first use

    @property
    def is_volume(self) -> bool:
        return self.endpoint.startswith(("/", "."))

    async def open_sink(self, source: OpenedSource) -> Sink:
        if self.is_volume:
            path = Path(self.endpoint)
            # A directory (made if missing) gets disk.img; a file or device is written in place.
            block = path.exists() and not path.is_dir()
            return self._sinks.claim_sink(ClaimLocation(path, block))
        if source.length is None:
            raise EndpointError(
                "a DVCR destination needs the image's length before its data, and the "
                "source did not say it"
            )
        return await self._sinks.dvcr_sink(await self._dvcr(), source.length, source.filename)

    async def _dvcr(self) -> DvcrLocation:
        if self._dvcr_image is not None:
            return self._dvcr_image
        if self.endpoint.startswith("oci:"):
            directory, repo, tag = _split_oci(self.endpoint)
            self._dvcr_image = DvcrLocation(OciLayout(directory), repo, tag)
            return self._dvcr_image
        reference = Reference.parse(self.endpoint)
        if reference.tag is None:
            raise EndpointError(f"the destination {self.endpoint!r} needs a tag")
        host = reference.endpoint_host
        client = await connect_registry(
            host,
            credentials=_credentials(self.settings.auth_config, host),
            ca_bundle=self.settings.ca_bundle,
            insecure=self.settings.insecure,
        )
        store = RegistryStore(client)
        self._dvcr_image = DvcrLocation(store, reference.repository, reference.tag)
        return self._dvcr_image

    async def close(self) -> None:
        if self._dvcr_image is not None and isinstance(self._dvcr_image.store, RegistryStore):
            await self._dvcr_image.store.close()
