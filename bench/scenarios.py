"""What is measured: each scenario pits our server against one or more baselines.

A scenario starts the servers it needs (inside the run's ExitStack, so they are stopped
whatever happens) and hands back its contenders, ours first. Its comparisons say which
baseline figure each table row sets ours against, and the target ratio, if any.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.contenders import (
    CURL_GET,
    CURL_GET_FSYNC,
    NGINX_PUT,
    NGINX_PUT_CONVERT,
    NGINX_PUT_FSYNC,
    REGISTRY_PATCH,
    Contender,
    CurlGet,
    NginxPut,
    NginxPutConvert,
    OurHttpImport,
    OurUpload,
    RegistryPatch,
)
from bench.nginx import Nginx
from bench.ours import OurServer
from bench.registry import Registry
from bench.workdir import SourceFile, hashed_file


@dataclass(frozen=True)
class Context:
    workdir: Path
    source: SourceFile
    ours_env: dict[str, str] = field(default_factory=dict)  # extra environment for our server
    # Other versions of our server, run as extra contenders: label -> environment.
    candidates: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    baseline: str  # a series one of the baselines reports
    target: float | None  # the least acceptable ratio ours/baseline (throughput); None: shown only


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    comparisons: tuple[Comparison, ...]
    open: Callable[[Context, ExitStack, str], tuple[list[OurUpload], list[Contender]]]


def our_uploads(
    ctx: Context,
    stack: ExitStack,
    name: str,
    flags: tuple[str, ...],
    algorithms: tuple[str, ...],
    source: SourceFile | None = None,
    storage: str = "PersistentVolumeClaim",
    http_url: str | None = None,
) -> list[OurUpload]:
    """Our server, and each candidate version, started with `flags`; ours first. With
    `http_url`, each imports from that URL instead of taking an upload."""
    uploads: list[OurUpload] = []
    for label, env in {"": ctx.ours_env, **ctx.candidates}.items():
        data_dir = ctx.workdir / (f"ours-{name}-{label}" if label else f"ours-{name}")
        server = stack.enter_context(OurServer(data_dir, flags, env))
        sent = source or ctx.source
        if http_url is not None:
            uploads.append(
                OurHttpImport(server, sent, name, algorithms, label, storage, url=http_url)
            )
        else:
            uploads.append(OurUpload(server, sent, name, algorithms, label, storage))
    return uploads


def _raw_upload_vs_nginx(
    flags: tuple[str, ...], algorithms: tuple[str, ...], storage: str = "PersistentVolumeClaim"
) -> Callable[[Context, ExitStack, str], tuple[list[OurUpload], list[Contender]]]:
    def open_(ctx: Context, stack: ExitStack, name: str) -> tuple[list[OurUpload], list[Contender]]:
        nginx_dir = ctx.workdir / f"nginx-{name}"
        nginx_dir.mkdir()
        nginx = stack.enter_context(Nginx(nginx_dir))
        ours = our_uploads(ctx, stack, name, flags, algorithms, storage=storage)
        return ours, [NginxPut(nginx, ctx.source)]

    return open_


def _qcow2_of(ctx: Context) -> SourceFile:
    """The random data as a qcow2 of twice its size, laid out as qemu writes images:
    tables first, then the data; half of the disk is unallocated."""
    path = ctx.workdir / "source.qcow2"
    if not path.exists():
        size = str(2 * ctx.source.size)
        create = ["qemu-img", "create", "-q", "-f", "qcow2", str(path), size]
        subprocess.run(create, check=True)
        raw = str(ctx.source.path)
        convert = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw, str(path)]
        subprocess.run(convert, check=True)
    return hashed_file(path)


def _qcow2_upload_vs_convert(
    ctx: Context, stack: ExitStack, name: str
) -> tuple[list[OurUpload], list[Contender]]:
    source = _qcow2_of(ctx)
    nginx_dir = ctx.workdir / f"nginx-{name}"
    nginx_dir.mkdir()
    nginx = stack.enter_context(Nginx(nginx_dir))
    ours = our_uploads(ctx, stack, name, (), ("sha256",), source)
    return ours, [NginxPutConvert(nginx, source, "qcow2", ctx.workdir)]


def _dvcr_upload_vs_registry_patch(
    ctx: Context, stack: ExitStack, name: str
) -> tuple[list[OurUpload], list[Contender]]:
    registry = stack.enter_context(Registry(ctx.workdir / f"registry-{name}"))
    flags = ("--dvcr", registry.url)
    ours = our_uploads(ctx, stack, name, flags, ("sha256",), storage="ContainerRegistry")
    return ours, [RegistryPatch(registry, ctx.source)]


def _http_import_vs_curl(
    ctx: Context, stack: ExitStack, name: str
) -> tuple[list[OurUpload], list[Contender]]:
    """nginx serves the source file (a hard link to it, so both readers share its page
    cache); our server imports it into a PVC, curl downloads it into a file beside."""
    nginx_dir = ctx.workdir / f"nginx-{name}"
    nginx_dir.mkdir()
    nginx = stack.enter_context(Nginx(nginx_dir))
    url, served = nginx.target("source.img")
    try:
        os.link(ctx.source.path, served)
    except OSError:
        shutil.copyfile(ctx.source.path, served)
    ours = our_uploads(ctx, stack, name, (), ("sha256",), http_url=url)
    return ours, [CurlGet(url, ctx.source, ctx.workdir / f"curl-{name}")]


_VS_NGINX = "vs nginx WebDAV PUT of the same file to the same disk"

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "raw-sha256",
            f"raw random file, curl -T -> PVC disk.img, sha256; {_VS_NGINX}",
            (Comparison(NGINX_PUT, 0.95), Comparison(NGINX_PUT_FSYNC, None)),
            _raw_upload_vs_nginx((), ("sha256",)),
        ),
        Scenario(
            "raw-sha256-md5",
            f"same, server started with --md5 (sha256 and md5); {_VS_NGINX}",
            (Comparison(NGINX_PUT, 0.85), Comparison(NGINX_PUT_FSYNC, None)),
            _raw_upload_vs_nginx(("--md5",), ("sha256", "md5")),
        ),
        Scenario(
            "qcow2-pvc",
            "qcow2 (the random data, in twice its size virtual), curl -T -> PVC raw, converted "
            "on the way; vs nginx PUT, then qemu-img convert -O raw and fsync (a scratch copy)",
            # time at most 0.6x theirs = throughput at least 1/0.6 of theirs
            (Comparison(NGINX_PUT_CONVERT, round(1 / 0.6, 2)),),
            _qcow2_upload_vs_convert,
        ),
        Scenario(
            "raw-dvcr-layout",
            f"raw random file, curl -T -> the embedded DVCR (OCI layout); {_VS_NGINX}",
            (Comparison(NGINX_PUT, None), Comparison(NGINX_PUT_FSYNC, None)),
            _raw_upload_vs_nginx((), ("sha256",), "ContainerRegistry"),
        ),
        Scenario(
            "raw-dvcr-registry",
            "raw random file, curl -T -> DVCR in a local docker-registry (tar layer, config, "
            "manifest, tag); vs curl streaming the same bytes in one PATCH to the registry",
            (Comparison(REGISTRY_PATCH, 0.9),),
            _dvcr_upload_vs_registry_patch,
        ),
        Scenario(
            "http-import-pvc",
            "raw random file served by nginx, dataSource.type HTTP -> PVC disk.img, sha256, "
            "timed from the create request until Ready; vs curl -o of the same URL into a "
            "file on the same disk, then fsync",
            (Comparison(CURL_GET, None), Comparison(CURL_GET_FSYNC, 0.9)),
            _http_import_vs_curl,
        ),
    )
}
