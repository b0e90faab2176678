"""The pod's one destination: the DVCR reference of `UPLOADER_DESTINATION_ENDPOINT`, with
the credentials and TLS settings Deckhouse's binary takes for it.

Credentials: `UPLOADER_DESTINATION_ACCESS_KEY_ID`/`_SECRET_KEY` when either is set, else
the entry for the reference's registry in `UPLOADER_DESTINATION_AUTH_CONFIG` (a
dockerconfigjson, as the controller mounts it), else none. TLS: the registry's
certificate is checked against the system's CAs and `UPLOADER_DESTINATION_CA_BUNDLE` (a
PEM file or a directory of them), or not at all with `DESTINATION_INSECURE_TLS`.

`PodStorage` is the server's storage with every image going to that one reference: the
server's upload machinery (resume, validation, the tag only once complete) runs
unchanged, and the image lands exactly where the controller looks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from importer.oci.auth import Credentials
from importer.oci.errors import RegistryError
from importer.oci.reference import Reference
from importer.oci.registry import RegistryClient
from importer.oci.registry_store import RegistryStore
from importer.oci.store import ImageStore
from importer.pipeline import Sink
from importer.sinks.factory import DvcrLocation
from uploader.pod.checksums import CheckedSink
from uploader.pod.options import OptionsError, PodOptions
from uploader.server.config import ServerConfig
from uploader.server.destinations import Storage
from uploader.server.image_db import Object

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class PodDestination:
    reference: Reference
    credentials: Credentials | None
    ca_bundle: bytes | None
    insecure: bool

    @property
    def repository(self) -> str:
        return self.reference.repository

    @property
    def tag(self) -> str:
        assert self.reference.tag is not None  # options.py refuses a reference without one
        return self.reference.tag


def _ca_bundle(path: Path) -> bytes:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    try:
        pems = [f.read_bytes() for f in files]
    except OSError as exc:
        raise OptionsError(f"UPLOADER_DESTINATION_CA_BUNDLE: {exc}") from None
    bundle = b"\n".join(p for p in pems if _PEM_CERTIFICATE in p)
    if not bundle:
        raise OptionsError(f"UPLOADER_DESTINATION_CA_BUNDLE: no PEM certificate in {path}")
    return bundle


def _credentials(options: PodOptions, host: str) -> Credentials | None:
    if options.destination_username or options.destination_password:
        return Credentials(options.destination_username, options.destination_password)
    if options.destination_auth_config is None:
        return None
    try:
        found = Credentials.from_docker_config(options.destination_auth_config, host)
    except RegistryError as exc:
        raise OptionsError(f"UPLOADER_DESTINATION_AUTH_CONFIG: {exc}") from None
    if found is None:
        raise OptionsError(
            f"UPLOADER_DESTINATION_AUTH_CONFIG: {options.destination_auth_config} has no "
            f"credentials for {host}"
        )
    return found


def pod_destination(options: PodOptions) -> PodDestination:
    reference = options.destination
    assert reference is not None  # options.py requires it
    bundle = options.destination_ca_bundle
    return PodDestination(
        reference,
        _credentials(options, reference.endpoint_host),
        _ca_bundle(bundle) if bundle is not None else None,
        options.destination_insecure,
    )


class PodStorage(Storage):
    """The server's storage, its DVCR the destination's registry and every image the
    destination's reference; `checked` are the digests the image's spec cannot hold
    (uploader/pod/checksums.py), checked before the tag is written."""

    def __init__(
        self, config: ServerConfig, destination: PodDestination, checked: dict[str, str]
    ) -> None:
        self.destination = destination  # before Storage opens the DVCR with it
        self.checked = checked
        super().__init__(config)

    def _open_dvcr(self) -> ImageStore:
        # Named without a scheme: HTTPS, or plain HTTP where importer/oci/endpoint.py
        # allows it (loopback, or DESTINATION_INSECURE_TLS), as Docker does.
        client = RegistryClient(
            self.destination.reference.endpoint_host,
            credentials=self.destination.credentials,
            ca_bundle=self.destination.ca_bundle,
            insecure=self.destination.insecure,
        )
        return RegistryStore(client)

    def target_status(self, obj: Object) -> dict[str, str]:
        return {"registryURL": str(self.destination.reference)}

    async def open_sink(self, obj: Object, length: int | None, filename: str | None = None) -> Sink:
        self.check_length(obj, length)
        assert length is not None
        image = DvcrLocation(self.dvcr, self.destination.repository, self.destination.tag)
        sink = await self.sinks.dvcr_sink(image, length, filename)
        return CheckedSink(sink, self.checked) if self.checked else sink

    async def remove_data(self, obj: Object) -> None:
        """Nothing: the pod never deletes what is at its destination."""
