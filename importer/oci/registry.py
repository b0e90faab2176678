"""An async client of the OCI distribution (Docker Registry v2) API, for what DVCR needs:
blob push (streamed), mount and existence checks, manifests, pulls, tags and deletion."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from yarl import URL

from importer.netguard import AddressGuard
from importer.oci.auth import Credentials
from importer.oci.authorizer import CATALOG_SCOPE, delete_scope, pull_scope, push_scope
from importer.oci.errors import RegistryError
from importer.oci.reference import check_repository
from importer.oci.transport import DEFAULT_IO_TIMEOUT, Transport, with_query_param
from importer.oci.upload import QUEUE_ITEMS, BlobUpload

__all__ = [
    "MANIFEST_MEDIA_TYPES",
    "BlobUpload",
    "Credentials",
    "RegistryClient",
    "RegistryError",
    "connect_registry",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

MAX_MANIFEST_SIZE = 4 << 20  # what distribution itself accepts
PAGE_SIZE = 1000


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """`async with RegistryClient("http://127.0.0.1:5000") as registry: ...`

    The registry may also be named without a scheme (`127.0.0.1:5000`, `reg.example`): it
    is then reached over HTTPS, or plain HTTP where importer/oci/endpoint.py allows it,
    decided on the first request (or by `resolve_endpoint()`).
    `io_timeout` bounds every wait for the registry: an answer, or room to send more data.
    `guard` (importer/netguard.py) limits where it connects: set for registries users name,
    not for the server's own DVCR.
    """

    def __init__(
        self,
        base_url: str,
        *,
        credentials: Credentials | None = None,
        ca_bundle: bytes | None = None,
        insecure: bool = False,
        io_timeout: float = DEFAULT_IO_TIMEOUT,
        upload_queue_items: int = QUEUE_ITEMS,
        guard: AddressGuard | None = None,
    ) -> None:
        self._transport = Transport(
            base_url,
            credentials=credentials,
            ca_bundle=ca_bundle,
            insecure=insecure,
            io_timeout=io_timeout,
            guard=guard,
        )
        self._upload_queue_items = upload_queue_items

    @property
    def base_url(self) -> str:
        """The registry's URL; for a name without a scheme, its https:// URL until the first
        request (or `resolve_endpoint()`) has decided."""
        return str(self._transport.base_url)

    async def resolve_endpoint(self) -> str:
        """Decides the scheme now (one `GET /v2/` for a name without one); the base URL."""
        what = f"reaching the registry {self._transport.endpoint.netloc}"
        return str(await self._transport.decide_scheme(what))

    async def __aenter__(self) -> RegistryClient:
        self._transport.session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    @property
    def tokens_fetched(self) -> int:
        """How many bearer tokens were obtained so far (the rest came from the cache)."""
        return self._transport.authorizer.tokens_fetched

    async def blob_exists(self, repo: str, digest: str) -> int | None:
        """The blob's size when the repository has it, else None."""
        url = self._url(repo, f"blobs/{digest}")
        what = f"checking blob {digest} in {repo}"
        async with self._transport.request(
            "HEAD", url, what=what, scope=pull_scope(repo), ok={200, 404}
        ) as response:
            if response.status == 404:
                return None
            return int(response.headers.get("Content-Length", "0"))

    async def start_blob_upload(self, repo: str) -> BlobUpload:
        url = self._url(repo, "blobs/uploads/")
        what = f"starting a blob upload to {repo}"
        async with self._transport.request(
            "POST", url, what=what, scope=push_scope(repo), ok={202}
        ) as response:
            location = self._transport.location(response, what)
        return BlobUpload(self._transport, repo, location, queue_items=self._upload_queue_items)

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Links a blob of `from_repo` into `repo` without sending it; False when the
        registry cannot (it then opened an upload session, which is cancelled here)."""
        check_repository(from_repo)
        url = self._url(repo, "blobs/uploads/").with_query({"mount": digest, "from": from_repo})
        what = f"mounting blob {digest} from {from_repo} into {repo}"
        scope = push_scope(repo) + pull_scope(from_repo)
        async with self._transport.request(
            "POST", url, what=what, scope=scope, ok={201, 202}
        ) as response:
            if response.status == 201:
                return True
            location = self._transport.location(response, what)
        await BlobUpload(self._transport, repo, location).cancel()
        return False

    async def push_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """A small blob (a config) in one PUT; returns its digest."""
        digest = digest or sha256_digest(data)
        upload = await self.start_blob_upload(repo)
        url = with_query_param(upload.location, "digest", digest)
        what = f"pushing blob {digest} to {repo}"
        try:
            async with self._transport.request(
                "PUT",
                url,
                what=what,
                scope=push_scope(repo),
                ok={201},
                headers={"Content-Type": "application/octet-stream"},
                data=data,
            ):
                pass
        except BaseException:
            await upload.cancel()
            raise
        return digest

    async def put_manifest(
        self, repo: str, reference: str, manifest: bytes, media_type: str
    ) -> str:
        """Stores the manifest under a tag or digest; returns its digest."""
        url = self._url(repo, f"manifests/{reference}")
        what = f"pushing the manifest of {repo}:{reference}"
        async with self._transport.request(
            "PUT",
            url,
            what=what,
            scope=push_scope(repo),
            ok={201},
            headers={"Content-Type": media_type},
            data=manifest,
        ) as response:
            return response.headers.get("Docker-Content-Digest") or sha256_digest(manifest)

    async def get_manifest(
        self, repo: str, reference: str, accept: Sequence[str] = MANIFEST_MEDIA_TYPES
    ) -> tuple[bytes, str, str]:
        """The manifest's bytes, media type and digest (checked when `reference` is one)."""
        url = self._url(repo, f"manifests/{reference}")
        what = f"getting the manifest of {repo}:{reference}"
        async with self._transport.request(
            "GET",
            url,
            what=what,
            scope=pull_scope(repo),
            ok={200},
            headers={"Accept": ", ".join(accept)},
        ) as response:
            length = response.content_length
            if length is not None and length > MAX_MANIFEST_SIZE:
                raise RegistryError(f"{what}: the manifest is too large ({length} bytes)")
            body = await response.content.read(MAX_MANIFEST_SIZE + 1)
            if len(body) > MAX_MANIFEST_SIZE:
                raise RegistryError(f"{what}: the manifest is too large")
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        digest = sha256_digest(body)
        if reference.startswith("sha256:") and reference != digest:
            raise RegistryError(f"{what}: the registry sent a manifest with digest {digest}")
        return body, media_type, digest

    async def get_blob(self, repo: str, digest: str) -> AsyncIterator[bytes]:
        """The blob's bytes as they arrive (redirects to a storage backend are followed).
        The digest is not checked here: the caller hashes the bytes where it reads them."""
        url = self._url(repo, f"blobs/{digest}")
        what = f"pulling blob {digest} from {repo}"
        async with self._transport.request(
            "GET", url, what=what, scope=pull_scope(repo), ok={200}, raw=True
        ) as response:
            async for chunk in response.content.iter_any():
                yield chunk

    async def delete_manifest(self, repo: str, reference: str) -> None:
        """Deletes the manifest a tag (or digest) names; a missing one is not an error.
        The registry deletes by digest, which also drops every other tag of that manifest."""
        what = f"deleting the manifest of {repo}:{reference}"
        digest = reference if ":" in reference else await self._resolve_tag(repo, reference)
        if digest is None:
            return
        async with self._transport.request(
            "DELETE",
            self._url(repo, f"manifests/{digest}"),
            what=what,
            scope=delete_scope(repo),
            ok={202, 404},
        ):
            pass

    async def list_tags(self, repo: str) -> list[str]:
        """The repository's tags; an unknown repository has none."""
        url = self._url(repo, "tags/list").with_query({"n": str(PAGE_SIZE)})
        return await self._paginated(url, "tags", f"listing the tags of {repo}", pull_scope(repo))

    async def catalog(self) -> list[str]:
        url = self._transport.url("_catalog").with_query({"n": str(PAGE_SIZE)})
        return await self._paginated(url, "repositories", "listing the repositories", CATALOG_SCOPE)

    async def _resolve_tag(self, repo: str, tag: str) -> str | None:
        what = f"looking up the manifest of {repo}:{tag}"
        async with self._transport.request(
            "HEAD",
            self._url(repo, f"manifests/{tag}"),
            what=what,
            scope=pull_scope(repo),
            ok={200, 404},
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
        ) as response:
            if response.status == 404:
                return None
            digest = response.headers.get("Docker-Content-Digest")
        if digest:
            return digest
        _, _, digest = await self.get_manifest(repo, tag)
        return digest

    async def _paginated(self, url: URL, field: str, what: str, scope: Sequence[str]) -> list[str]:
        names: list[str] = []
        next_url: URL | None = url
        while next_url is not None:
            async with self._transport.request(
                "GET", next_url, what=what, scope=scope, ok={200, 404}
            ) as response:
                if response.status == 404:
                    return names
                try:
                    document = await response.json(content_type=None)
                except ValueError:
                    raise RegistryError(f"{what}: the answer is not JSON") from None
                page = document.get(field) if isinstance(document, dict) else None
                names.extend(str(name) for name in page or [])
                next_link = response.links.get("next")
                link = next_link.get("url") if next_link is not None else None
                next_url = response.url.join(URL(str(link), encoded=True)) if link else None
        return names

    def _url(self, repo: str, rest: str) -> URL:
        return self._transport.url(f"{check_repository(repo)}/{rest}")


async def connect_registry(
    host_or_url: str,
    *,
    credentials: Credentials | None = None,
    ca_bundle: bytes | None = None,
    insecure: bool = False,
    io_timeout: float = DEFAULT_IO_TIMEOUT,
    upload_queue_items: int = QUEUE_ITEMS,
    guard: AddressGuard | None = None,
) -> RegistryClient:
    """A RegistryClient whose scheme is already decided (one `GET /v2/` for a name without
    a scheme, see importer/oci/endpoint.py); the caller closes it."""
    client = RegistryClient(
        host_or_url,
        credentials=credentials,
        ca_bundle=ca_bundle,
        insecure=insecure,
        io_timeout=io_timeout,
        upload_queue_items=upload_queue_items,
        guard=guard,
    )
    try:
        await client.resolve_endpoint()
    except BaseException:
        await client.close()
        raise
    return client
