"""What is measured: each scenario pits our server against one or more baselines.

A scenario starts the servers it needs (inside the run's ExitStack, so they are stopped
whatever happens) and hands back its contenders, ours first. Its comparisons say which
baseline figure each table row sets ours against, and the target ratio, if any.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.contenders import NGINX_PUT, NGINX_PUT_FSYNC, Contender, NginxPut, OurUpload
from bench.nginx import Nginx
from bench.ours import OurServer
from bench.workdir import SourceFile


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
    ctx: Context, stack: ExitStack, name: str, flags: tuple[str, ...], algorithms: tuple[str, ...]
) -> list[OurUpload]:
    """Our server, and each candidate version, started with `flags`; ours first."""
    uploads: list[OurUpload] = []
    for label, env in {"": ctx.ours_env, **ctx.candidates}.items():
        data_dir = ctx.workdir / (f"ours-{name}-{label}" if label else f"ours-{name}")
        server = stack.enter_context(OurServer(data_dir, flags, env))
        uploads.append(OurUpload(server, ctx.source, name, algorithms, label))
    return uploads


def _raw_upload_vs_nginx(
    flags: tuple[str, ...], algorithms: tuple[str, ...]
) -> Callable[[Context, ExitStack, str], tuple[list[OurUpload], list[Contender]]]:
    def open_(ctx: Context, stack: ExitStack, name: str) -> tuple[list[OurUpload], list[Contender]]:
        nginx_dir = ctx.workdir / f"nginx-{name}"
        nginx_dir.mkdir()
        nginx = stack.enter_context(Nginx(nginx_dir))
        ours = our_uploads(ctx, stack, name, flags, algorithms)
        return ours, [NginxPut(nginx, ctx.source)]

    return open_


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
    )
}
