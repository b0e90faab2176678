"""The two sides of a comparison. Each run is prepared, timed and cleaned up by its
contender; only the transfer itself is timed, and every run ends with its target deleted
and the disk synced, so the next run starts from the same state."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.curl import CurlFailed, finish_get, put_file, start_get
from bench.imagefiles import Compressor, StoredImage
from bench.imageio import ImageioDaemon
from bench.nginx import Nginx
from bench.ours import OurServer
from bench.procstat import CpuUse, Sampler
from bench.registry import Registry
from bench.workdir import SourceFile, fsync_path, settle

OURS = "ours"
NGINX_PUT = "nginx PUT"
NGINX_PUT_FSYNC = "nginx PUT+fsync"
NGINX_PUT_CONVERT = "nginx PUT + qemu-img convert"
IMAGEIO_PUT = "imageio PUT"
REGISTRY_PATCH = "curl PATCH to registry"
CURL_GET = "curl -o"
CURL_GET_FSYNC = "curl -o+fsync"


class RunFailed(RuntimeError):
    pass


@dataclass
class Sample:
    """One run: seconds per series (a contender may report more than one figure)."""

    seconds: dict[str, float]
    nbytes: int
    cpu: CpuUse | None = None
    peak_rss_kib: int = 0  # the most VmRSS seen while sampling the run


class Contender(Protocol):
    name: str
    series: tuple[str, ...]
    source: SourceFile  # what it sends; read into the page cache before each run

    def run(self, tag: str) -> Sample: ...


class OurContender(Contender, Protocol):
    """A contender that drives our server (or a candidate version of it)."""

    server: OurServer


def dns_name(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].rstrip("-")


def labelled(prefix: str, label: str) -> tuple[str, str]:
    """The image name prefix and the series name of our server, or of the candidate
    version `label` of it."""
    if not label:
        return prefix, OURS
    return f"{prefix}-{label}", f"{OURS}[{label}]"


class OurUpload:
    """`curl -T` into a new PVC image of our server; the answer comes once it is fsynced.
    A labelled instance is another version of the server (a candidate) in the same run."""

    def __init__(
        self,
        server: OurServer,
        source: SourceFile,
        prefix: str,
        algorithms: tuple[str, ...],
        label: str = "",
        storage: str = "PersistentVolumeClaim",
        stored: StoredImage | None = None,
    ) -> None:
        self.storage = storage
        self.stored = stored  # what the PVC's disk.img must hold afterwards, when given
        self.server = server
        self.source = source
        self.prefix, self.name = labelled(prefix, label)
        self.algorithms = algorithms
        self.label = label
        self.series = (self.name,)
        self.response = server.data_dir.parent / f"{self.prefix}-response.json"

    def run(self, tag: str) -> Sample:
        name = dns_name(f"bench-{self.prefix}-{tag}")
        url = self.server.create_upload(name, self.storage)
        try:
            with Sampler(self.server.pid) as sampler:
                result = put_file(self.source.path, url, self.response)
            self._check(result.code, result.body)
            if self.stored is not None:
                self._check_disk(self.server.claim_dir(name) / "disk.img", self.stored)
        finally:
            self.server.delete(name)
            settle()
        return Sample(
            {self.name: result.seconds}, self.source.size, sampler.cpu(), sampler.peak_rss_kib
        )

    def _check(self, code: int, body: bytes) -> None:
        if code != 200:
            raise RunFailed(f"our server answered {code}: {body[:500]!r}")
        answer = json.loads(body)
        want = {"sha256": self.source.sha256, "md5": self.source.md5}
        for algorithm in self.algorithms:
            got = (answer.get("checksum") or {}).get(algorithm)
            if got != want[algorithm]:
                raise RunFailed(f"our server reports {algorithm} {got}, the file has {want}")
        if answer.get("phase") != "Ready":
            raise RunFailed(f"the image is not Ready after the upload: {answer}")

    @staticmethod
    def _check_disk(disk: Path, stored: StoredImage) -> None:
        wrong = stored.differs_from(disk)
        if wrong:
            raise RunFailed(f"our server's {disk.name}: {wrong}")


class OurHttpImport(OurUpload):
    """A new image with `dataSource.type: HTTP` fed from `url` (nginx serving the source),
    timed from the create request until the image is Ready (its data fsynced), as a watch
    of the image reports it."""

    def __init__(
        self,
        server: OurServer,
        source: SourceFile,
        prefix: str,
        algorithms: tuple[str, ...],
        label: str = "",
        storage: str = "PersistentVolumeClaim",
        *,
        url: str,
    ) -> None:
        super().__init__(server, source, prefix, algorithms, label, storage)
        self.url = url

    def run(self, tag: str) -> Sample:
        name = dns_name(f"bench-{self.prefix}-{tag}")
        try:
            with Sampler(self.server.pid) as sampler:
                seconds, obj = self.server.import_http(name, self.url, self.storage)
            self._check_import(name, obj)
        finally:
            self.server.delete(name)
            settle()
        return Sample({self.name: seconds}, self.source.size, sampler.cpu(), sampler.peak_rss_kib)

    def _check_import(self, name: str, obj: dict[str, Any]) -> None:
        status = obj.get("status") or {}
        if status.get("phase") != "Ready":
            raise RunFailed(f"the import of {self.url} ended {status.get('phase')}: {status}")
        checksums = status.get("checksum") or {}
        want = {"sha256": self.source.sha256, "md5": self.source.md5}
        for algorithm in self.algorithms:
            if checksums.get(algorithm) != want[algorithm]:
                raise RunFailed(f"our server reports {checksums}, the file has {want}")
        if self.storage == "PersistentVolumeClaim":
            disk = self.server.claim_dir(name) / "disk.img"
            size = disk.stat().st_size if disk.exists() else None
            if size != self.source.size:
                raise RunFailed(f"{disk} holds {size} bytes of {self.source.size}")


class CurlGet:
    """`curl -o FILE URL` of what our server imports, into a file on the same disk. curl
    does not fsync, so the run reports two figures: until curl is done, and until the file
    is fsynced right after (what our server does before the image is Ready). The CPU
    figures are curl's: the downloader, as our server is."""

    name = "curl"
    series = (CURL_GET, CURL_GET_FSYNC)

    def __init__(self, url: str, source: SourceFile, target_dir: Path) -> None:
        self.url = url
        self.source = source
        self.target_dir = target_dir

    def run(self, tag: str) -> Sample:
        self.target_dir.mkdir(parents=True, exist_ok=True)
        path = self.target_dir / f"{tag}.img"
        with baseline_run(path):
            proc = start_get(self.url, path)
            with Sampler(proc.pid) as sampler:
                result = finish_get(proc, self.url)
                started = time.perf_counter()
                if result.code == 200:
                    fsync_path(path)
                fsync = time.perf_counter() - started
            if result.code != 200:
                raise RunFailed(f"curl got {result.code} from {self.url}")
            size = path.stat().st_size
            if size != self.source.size:
                raise RunFailed(f"curl stored {size} bytes of {self.source.size}")
        seconds = {CURL_GET: result.seconds, CURL_GET_FSYNC: result.seconds + fsync}
        return Sample(seconds, self.source.size, sampler.cpu(), sampler.peak_rss_kib)


class NginxPut:
    """WebDAV PUT to nginx. nginx answers before the data is on disk, so the run reports
    two figures: until the answer, and until the file is fsynced right after it."""

    name = "nginx"
    series = (NGINX_PUT, NGINX_PUT_FSYNC)

    def __init__(self, nginx: Nginx, source: SourceFile) -> None:
        self.nginx = nginx
        self.source = source
        self.response = nginx.prefix / "response.txt"

    def run(self, tag: str) -> Sample:
        url, path = self.nginx.target(f"{tag}/disk.img")
        with baseline_run(path, root=self.nginx.root):
            with Sampler(self.nginx.worker_pid()) as sampler:
                result = put_file(self.source.path, url, self.response)
                started = time.perf_counter()
                if result.code in (201, 204):
                    fsync_path(path)
                fsync = time.perf_counter() - started
            if result.code not in (201, 204):
                raise RunFailed(f"nginx answered {result.code}: {result.body[:500]!r}")
            size = path.stat().st_size
            if size != self.source.size:
                raise RunFailed(f"nginx stored {size} bytes of {self.source.size}")
        seconds = {NGINX_PUT: result.seconds, NGINX_PUT_FSYNC: result.seconds + fsync}
        return Sample(seconds, self.source.size, sampler.cpu(), sampler.peak_rss_kib)


@contextlib.contextmanager
def baseline_run(*paths: Path, root: Path | None = None) -> Iterator[None]:
    """One run of a baseline: failures of curl or of a tool it runs end it as RunFailed;
    whatever happens, its files are deleted afterwards (and, with `root`, the first one's
    emptied directories up to it) and the disk is settled for the next run."""
    try:
        yield
    except CurlFailed as exc:
        raise RunFailed(str(exc)) from None
    except subprocess.CalledProcessError as exc:
        raise RunFailed(f"{exc}: {exc.stderr!r}") from None
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
        if root is not None:
            remove_empty(paths[0].parent, root)
        settle()


def remove_empty(directory: Path, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def nginx_put_convert_series(decompressor: Compressor | None = None) -> str:
    if decompressor is None:
        return NGINX_PUT_CONVERT
    return f"nginx PUT + {decompressor.decompress[0]} -d + qemu-img convert"


class NginxPutConvert:
    """What a scratch-space importer does: nginx stores the upload, then `qemu-img convert`
    writes the raw disk, which is fsynced (as our server's is before it answers). With a
    `decompressor`, the upload is a compressed image: it is first decompressed into a
    scratch file beside the disk (qemu-img needs a file it can seek in)."""

    name = "nginx+convert"

    def __init__(
        self,
        nginx: Nginx,
        source: SourceFile,
        fmt: str,
        target_dir: Path,
        decompressor: Compressor | None = None,
    ) -> None:
        self.nginx = nginx
        self.source = source
        self.fmt = fmt
        self.target_dir = target_dir
        self.decompressor = decompressor
        self.series = (nginx_put_convert_series(decompressor),)
        self.response = nginx.prefix / "response.txt"

    def run(self, tag: str) -> Sample:
        suffix = self.decompressor.suffix if self.decompressor else ""
        url, path = self.nginx.target(f"{tag}/disk.{self.fmt}{suffix}")
        self.target_dir.mkdir(parents=True, exist_ok=True)
        scratch = self.target_dir / f"{tag}.{self.fmt}"
        raw = self.target_dir / f"{tag}.raw"
        with (
            baseline_run(path, scratch, raw, root=self.nginx.root),
            Sampler(self.nginx.worker_pid()) as sampler,
        ):
            result = put_file(self.source.path, url, self.response)
            if result.code not in (201, 204):
                raise RunFailed(f"nginx answered {result.code}: {result.body[:500]!r}")
            started = time.perf_counter()
            image = path
            if self.decompressor is not None:
                with open(scratch, "wb") as out:
                    decompress = [*self.decompressor.decompress, str(path)]
                    subprocess.run(decompress, stdout=out, stderr=subprocess.PIPE, check=True)
                image = scratch
            convert = ["qemu-img", "convert", "-f", self.fmt, "-O", "raw", str(image), str(raw)]
            subprocess.run(convert, check=True, capture_output=True)
            fsync_path(raw)
            converted = time.perf_counter() - started
        seconds = {self.series[0]: result.seconds + converted}
        return Sample(seconds, self.source.size, sampler.cpu(), sampler.peak_rss_kib)


class ImageioPut:
    """`curl -T` to ovirt-imageio's daemon into a file on the same disk. The target file is
    made (empty, of the right size: the daemon writes into an existing file) and a ticket
    added before the clock starts; the daemon answers once the data is flushed."""

    name = "imageio"
    series = (IMAGEIO_PUT,)

    def __init__(self, daemon: ImageioDaemon, source: SourceFile, target_dir: Path) -> None:
        self.daemon = daemon
        self.source = source
        self.target_dir = target_dir
        self.response = daemon.prefix / "response.txt"

    def run(self, tag: str) -> Sample:
        self.target_dir.mkdir(parents=True, exist_ok=True)
        path = self.target_dir / f"{tag}.img"
        ticket = str(uuid.uuid4())
        with open(path, "wb") as f:
            f.truncate(self.source.size)
        with baseline_run(path):
            self.daemon.add_ticket(ticket, path, self.source.size)
            try:
                url = self.daemon.image_url(ticket)
                with Sampler(self.daemon.pid) as sampler:
                    result = put_file(self.source.path, url, self.response)
            finally:
                self.daemon.remove_ticket(ticket)
            if result.code != 200:
                raise RunFailed(f"ovirt-imageio answered {result.code}: {result.body[:500]!r}")
            size = path.stat().st_size
            if size != self.source.size:
                raise RunFailed(f"ovirt-imageio left {size} bytes of {self.source.size}")
        return Sample(
            {IMAGEIO_PUT: result.seconds}, self.source.size, sampler.cpu(), sampler.peak_rss_kib
        )


class RegistryPatch:
    """The registry's fastest path, driven by curl: open an upload session, stream the
    file in one PATCH, close it with `PUT ?digest=`. The same bytes our server sends
    inside its layer, so both sides are bounded by the registry's own hashing."""

    name = "registry"
    series = (REGISTRY_PATCH,)

    def __init__(self, registry: Registry, source: SourceFile) -> None:
        self.registry = registry
        self.source = source

    def run(self, tag: str) -> Sample:
        repo = f"bench/{dns_name(tag)}"
        started = time.perf_counter()
        with Sampler(self.registry.pid) as sampler:
            request = urllib.request.Request(
                f"{self.registry.url}/v2/{repo}/blobs/uploads/", method="POST"
            )
            with urllib.request.urlopen(request) as response:
                location = urllib.parse.urljoin(self.registry.url, response.headers["Location"])
            patch = subprocess.run(
                [
                    "curl", "-sS", "-X", "PATCH", "-D", "-", "-o", "/dev/null",
                    "-H", "Content-Type: application/octet-stream",
                    "-T", str(self.source.path), location,
                ],
                capture_output=True, check=True, text=True,
            )  # fmt: skip
            headers = dict(
                line.split(": ", 1) for line in patch.stdout.splitlines()[1:] if ": " in line
            )
            location = urllib.parse.urljoin(
                self.registry.url, headers.get("Location") or headers["location"]
            )
            separator = "&" if "?" in location else "?"
            digest = f"sha256:{self.source.sha256}"
            put = urllib.request.Request(f"{location}{separator}digest={digest}", method="PUT")
            with urllib.request.urlopen(put) as response:
                if response.status != 201:
                    raise RunFailed(f"the registry answered {response.status} to the PUT")
        seconds = time.perf_counter() - started
        settle()
        return Sample(
            {REGISTRY_PATCH: seconds}, self.source.size, sampler.cpu(), sampler.peak_rss_kib
        )
