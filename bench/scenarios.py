"""What is measured: each scenario pits our server against one or more baselines.

A scenario starts the servers it needs (inside the run's ExitStack, so they are stopped
whatever happens) and hands back its contenders, ours first. Its comparisons say which
baseline figure each table row sets ours against, and the target ratio, if any; a
scenario may also set a ceiling on our server's peak memory.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench import imageio
from bench.compressible import compressible_file
from bench.contenders import (
    CURL_GET,
    CURL_GET_FSYNC,
    IMAGEIO_PUT,
    NGINX_PUT,
    NGINX_PUT_CONVERT,
    NGINX_PUT_FSYNC,
    REGISTRY_PATCH,
    Contender,
    CurlGet,
    ImageioPut,
    NginxPut,
    NginxPutConvert,
    OurContender,
    OurHttpImport,
    OurUpload,
    RegistryPatch,
    nginx_put_convert_series,
)
from bench.imagefiles import XZ, ZSTD, Compressor, StoredImage, compressed_of, qcow2_of
from bench.nginx import Nginx
from bench.ours import OurServer
from bench.parallel import NginxParallelPuts, OurParallelUploads, nginx_series
from bench.registry import Registry
from bench.repeated import OurRepeatedUpload
from bench.slowproxy import ThrottledProxy
from bench.units import MB
from bench.workdir import SourceFile, random_file

PARALLEL_UPLOADS = 8  # concurrent-8-pvc: this many uploads of a quarter of --size each
SLOW_SINK_COPIES = 4  # slow-sink-rss: one upload of this many times --size
SLOW_SINK_RATE = 50 * MB  # bytes per second the throttled registry takes


@dataclass(frozen=True)
class Context:
    workdir: Path
    source: SourceFile
    ours_env: dict[str, str] = field(default_factory=dict)  # extra environment for our server
    # Other versions of our server, run as extra contenders: label -> environment.
    candidates: dict[str, dict[str, str]] = field(default_factory=dict)
    # Files made for scenarios, by path: made once per run, shared between scenarios.
    made: dict[Path, SourceFile] = field(default_factory=dict)

    def file(self, path: Path, make: Callable[[], SourceFile]) -> SourceFile:
        if path not in self.made:
            self.made[path] = make()
        return self.made[path]


@dataclass(frozen=True)
class Comparison:
    baseline: str  # a series one of the baselines reports
    target: float | None  # the least acceptable ratio ours/baseline (throughput); None: shown only


Opener = Callable[[Context, ExitStack, str], tuple[list[OurContender], list[Contender]]]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    comparisons: tuple[Comparison, ...]  # none: one row with our figures alone
    open: Opener
    max_rss_mib: int | None = None  # a target: the most our server's peak RSS may be
    single_run: bool = False  # one measured run and no warm-up, whatever --rounds says
    # Disk space, in multiples of --size: the most its runs need at once, and what it
    # makes once and keeps until the run's end (its source files).
    disk: float = 2.0
    keeps: float = 0.0


def our_servers(
    ctx: Context, stack: ExitStack, name: str, flags: tuple[str, ...]
) -> list[tuple[str, OurServer]]:
    """Our server, and each candidate version, started with `flags`; ours (label "") first."""
    servers: list[tuple[str, OurServer]] = []
    for label, env in {"": ctx.ours_env, **ctx.candidates}.items():
        data_dir = ctx.workdir / (f"ours-{name}-{label}" if label else f"ours-{name}")
        servers.append((label, stack.enter_context(OurServer(data_dir, flags, env))))
    return servers


def our_uploads(
    ctx: Context,
    stack: ExitStack,
    name: str,
    flags: tuple[str, ...],
    algorithms: tuple[str, ...],
    source: SourceFile | None = None,
    storage: str = "PersistentVolumeClaim",
    http_url: str | None = None,
    stored: StoredImage | None = None,
) -> list[OurContender]:
    """`curl -T` into our server and each candidate; with `http_url`, each imports from
    that URL instead of taking an upload."""
    sent = source or ctx.source
    uploads: list[OurContender] = []
    for label, server in our_servers(ctx, stack, name, flags):
        if http_url is not None:
            uploads.append(
                OurHttpImport(server, sent, name, algorithms, label, storage, url=http_url)
            )
        else:
            uploads.append(OurUpload(server, sent, name, algorithms, label, storage, stored))
    return uploads


@functools.cache
def _imageio_program() -> Path | None:
    """Installed once per run at most; None (and a note) when it cannot be."""
    try:
        return imageio.install()
    except imageio.Unavailable as exc:
        print(f"ovirt-imageio is not available, its rows are left out: {exc}", file=sys.stderr)
        return None


def _imageio_put(ctx: Context, stack: ExitStack, name: str) -> list[Contender]:
    program = _imageio_program()
    if program is None:
        return []
    daemon = stack.enter_context(imageio.ImageioDaemon(program, ctx.workdir / f"imageio-{name}"))
    return [ImageioPut(daemon, ctx.source, ctx.workdir / f"imageio-{name}" / "images")]


def _nginx(ctx: Context, stack: ExitStack, name: str, workers: int | str = 1) -> Nginx:
    nginx_dir = ctx.workdir / f"nginx-{name}"
    nginx_dir.mkdir()
    return stack.enter_context(Nginx(nginx_dir, workers))


def _raw_upload_vs_nginx(
    flags: tuple[str, ...],
    algorithms: tuple[str, ...],
    storage: str = "PersistentVolumeClaim",
    with_imageio: bool = False,
) -> Opener:
    def open_(
        ctx: Context, stack: ExitStack, name: str
    ) -> tuple[list[OurContender], list[Contender]]:
        nginx = _nginx(ctx, stack, name)
        baselines: list[Contender] = [NginxPut(nginx, ctx.source)]
        if with_imageio:
            baselines += _imageio_put(ctx, stack, name)
        ours = our_uploads(ctx, stack, name, flags, algorithms, storage=storage)
        return ours, baselines

    return open_


def _qcow2_upload_vs_convert(
    ctx: Context, stack: ExitStack, name: str
) -> tuple[list[OurContender], list[Contender]]:
    path = ctx.workdir / "source.qcow2"
    source = ctx.file(path, lambda: qcow2_of(ctx.source, path))
    nginx = _nginx(ctx, stack, name)
    stored = StoredImage(ctx.source, 2 * ctx.source.size)
    ours = our_uploads(ctx, stack, name, (), ("sha256",), source, stored=stored)
    return ours, [NginxPutConvert(nginx, source, "qcow2", ctx.workdir / f"convert-{name}")]


def _compressible_qcow2(ctx: Context) -> tuple[SourceFile, SourceFile]:
    """Data that compresses about 2.5-3x, of --size, and a qcow2 of twice that made of it."""
    raw_path = ctx.workdir / "compressible.raw"
    raw = ctx.file(raw_path, lambda: compressible_file(raw_path, ctx.source.size))
    qcow2_path = ctx.workdir / "compressible.qcow2"
    return raw, ctx.file(qcow2_path, lambda: qcow2_of(raw, qcow2_path))


def _compressed_qcow2_vs_decompress_convert(compressor: Compressor) -> Opener:
    def open_(
        ctx: Context, stack: ExitStack, name: str
    ) -> tuple[list[OurContender], list[Contender]]:
        raw, qcow2 = _compressible_qcow2(ctx)
        path = qcow2.path.with_name(qcow2.path.name + compressor.suffix)
        source = ctx.file(path, lambda: compressed_of(qcow2, compressor))
        nginx = _nginx(ctx, stack, name)
        stored = StoredImage(raw, 2 * raw.size)
        ours = our_uploads(ctx, stack, name, (), ("sha256",), source, stored=stored)
        scratch = ctx.workdir / f"convert-{name}"
        return ours, [NginxPutConvert(nginx, source, "qcow2", scratch, compressor)]

    return open_


def _parallel_uploads_vs_nginx(
    ctx: Context, stack: ExitStack, name: str
) -> tuple[list[OurContender], list[Contender]]:
    path = ctx.workdir / "quarter.raw"
    source = ctx.file(path, lambda: random_file(path, ctx.source.size // 4))
    nginx = _nginx(ctx, stack, name, workers="auto")
    ours: list[OurContender] = [
        OurParallelUploads(server, source, name, PARALLEL_UPLOADS, label)
        for label, server in our_servers(ctx, stack, name, ())
    ]
    return ours, [NginxParallelPuts(nginx, source, PARALLEL_UPLOADS)]


def _long_upload_to_slow_registry(
    ctx: Context, stack: ExitStack, name: str
) -> tuple[list[OurContender], list[Contender]]:
    root = ctx.workdir / f"registry-{name}"
    stack.callback(shutil.rmtree, root, ignore_errors=True)  # the blob is 4x --size
    registry = stack.enter_context(Registry(root))
    proxy = stack.enter_context(ThrottledProxy(registry.port, SLOW_SINK_RATE))
    ours: list[OurContender] = [
        OurRepeatedUpload(server, ctx.source, name, SLOW_SINK_COPIES, "ContainerRegistry", label)
        for label, server in our_servers(ctx, stack, name, ("--dvcr", proxy.url))
    ]
    return ours, []


def _dvcr_upload_vs_registry_patch(
    ctx: Context, stack: ExitStack, name: str
) -> tuple[list[OurContender], list[Contender]]:
    root = ctx.workdir / f"registry-{name}"
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    registry = stack.enter_context(Registry(root))
    flags = ("--dvcr", registry.url)
    ours = our_uploads(ctx, stack, name, flags, ("sha256",), storage="ContainerRegistry")
    return ours, [RegistryPatch(registry, ctx.source)]


def _http_import_vs_curl(
    ctx: Context, stack: ExitStack, name: str
) -> tuple[list[OurContender], list[Contender]]:
    """nginx serves the source file (a hard link to it, so both readers share its page
    cache); our server imports it into a PVC, curl downloads it into a file beside."""
    nginx = _nginx(ctx, stack, name)
    url, served = nginx.target("source.img")
    try:
        os.link(ctx.source.path, served)
    except OSError:
        shutil.copyfile(ctx.source.path, served)
    ours = our_uploads(ctx, stack, name, (), ("sha256",), http_url=url)
    return ours, [CurlGet(url, ctx.source, ctx.workdir / f"curl-{name}")]


_VS_NGINX = "vs nginx WebDAV PUT of the same file to the same disk"
_VS_NGINX_IMAGEIO = "vs nginx WebDAV PUT and ovirt-imageio PUT of the same file to the same disk"


def _at_most_time(fraction: float) -> float:
    """A target "our time at most `fraction` of theirs" as the least throughput ratio."""
    return 1 / fraction


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "raw-sha256",
            f"raw random file, curl -T -> PVC disk.img, sha256; {_VS_NGINX_IMAGEIO}",
            (
                Comparison(NGINX_PUT, 1.0),
                Comparison(NGINX_PUT_FSYNC, None),
                Comparison(IMAGEIO_PUT, 1.0),
            ),
            _raw_upload_vs_nginx((), ("sha256",), with_imageio=True),
            disk=1,
        ),
        Scenario(
            "raw-sha256-md5",
            f"same, server started with --md5 (sha256 and md5); {_VS_NGINX_IMAGEIO}",
            (
                Comparison(NGINX_PUT, 0.9),
                Comparison(NGINX_PUT_FSYNC, None),
                Comparison(IMAGEIO_PUT, None),
            ),
            _raw_upload_vs_nginx(("--md5",), ("sha256", "md5"), with_imageio=True),
            disk=1,
        ),
        Scenario(
            "qcow2-pvc",
            "qcow2 (the random data, in twice its size virtual), curl -T -> PVC raw, converted "
            "on the way; vs nginx PUT, then qemu-img convert -O raw and fsync (a scratch copy)",
            (Comparison(NGINX_PUT_CONVERT, _at_most_time(0.5)),),
            _qcow2_upload_vs_convert,
            disk=2,
            keeps=1,
        ),
        Scenario(
            "qcow2-xz-pvc",
            "qcow2 of compressible data (--size of it, twice that virtual) compressed with "
            "xz -T0, curl -T -> PVC raw, decompressed and converted on the way; vs nginx PUT, "
            "then xz -d into a scratch file, qemu-img convert -O raw and fsync",
            (Comparison(nginx_put_convert_series(XZ), _at_most_time(0.7)),),
            _compressed_qcow2_vs_decompress_convert(XZ),
            disk=2.5,
            keeps=2.5,
        ),
        Scenario(
            "qcow2-zst-pvc",
            "the same qcow2 compressed with zstd -T0, curl -T -> PVC raw; vs nginx PUT, then "
            "zstd -d into a scratch file, qemu-img convert -O raw and fsync",
            (Comparison(nginx_put_convert_series(ZSTD), _at_most_time(0.7)),),
            _compressed_qcow2_vs_decompress_convert(ZSTD),
            disk=2.5,
            keeps=2.5,
        ),
        Scenario(
            "raw-dvcr-layout",
            f"raw random file, curl -T -> the embedded DVCR (OCI layout); {_VS_NGINX}",
            (Comparison(NGINX_PUT, None), Comparison(NGINX_PUT_FSYNC, None)),
            _raw_upload_vs_nginx((), ("sha256",), "ContainerRegistry"),
            disk=1,
        ),
        Scenario(
            "raw-dvcr-registry",
            "raw random file, curl -T -> DVCR in a local docker-registry (tar layer, config, "
            "manifest, tag); vs curl streaming the same bytes in one PATCH to the registry",
            (Comparison(REGISTRY_PATCH, 0.95),),
            _dvcr_upload_vs_registry_patch,
            disk=2,
        ),
        Scenario(
            "http-import-pvc",
            "raw random file served by nginx, dataSource.type HTTP -> PVC disk.img, sha256, "
            "timed from the create request until Ready; vs curl -o of the same URL into a "
            "file on the same disk (and that file fsynced, shown)",
            (Comparison(CURL_GET, 0.95), Comparison(CURL_GET_FSYNC, None)),
            _http_import_vs_curl,
            disk=1,
        ),
        Scenario(
            "concurrent-8-pvc",
            f"{PARALLEL_UPLOADS} uploads at once of a random file of a quarter of --size, "
            f"each curl -T -> its own PVC image, aggregate; vs {PARALLEL_UPLOADS} nginx PUTs "
            "at once (nginx worker_processes auto)",
            (
                Comparison(nginx_series(PARALLEL_UPLOADS)[0], 0.9),
                Comparison(nginx_series(PARALLEL_UPLOADS)[1], None),
            ),
            _parallel_uploads_vs_nginx,
            disk=PARALLEL_UPLOADS / 4,
            keeps=0.25,
        ),
        Scenario(
            "slow-sink-rss",
            f"one upload of {SLOW_SINK_COPIES}x --size (the random file, piped "
            f"{SLOW_SINK_COPIES} times) -> DVCR in a local docker-registry behind a proxy "
            f"that takes {SLOW_SINK_RATE // MB} MB/s; the sender is not limited; our peak "
            "RSS. One run, no warm-up",
            (),
            _long_upload_to_slow_registry,
            max_rss_mib=128,
            single_run=True,
            disk=SLOW_SINK_COPIES + 0.5,
        ),
    )
}
