"""`dvcr-importer`: one import per run, for in-cluster pods (README: "The importer job").

Configured by flags or by Deckhouse's importer environment; serves /metrics while it runs;
writes a JSON termination message at the end; exits 0 on success, 1 when the import
failed, 2 when it was configured wrongly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from importer.errors import TransferError
from importer.formats.base import Limits, TiB
from importer.job_endpoints import Destination, RegistrySettings, source_opener
from importer.metrics import CONTENT_TYPE_LATEST, Metrics
from importer.pipeline import PipelineOptions, TransferResult
from importer.progress import Progress
from importer.sources.opened import OpenedSource
from importer.transfer import run_transfer

log = logging.getLogger("dvcr-importer")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SOURCES = ("http", "registry", "dvcr", "blockDevice", "filesystem")


class UsageError(Exception):
    pass


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="dvcr-importer",
        description="Import one image; flags default to Deckhouse's IMPORTER_* environment.",
    )
    parser.add_argument("--source", default=env("IMPORTER_SOURCE"), choices=SOURCES)
    parser.add_argument(
        "--endpoint",
        default=env("IMPORTER_ENDPOINT"),
        help="a URL (http), an image reference (registry, dvcr) or a path",
    )
    parser.add_argument(
        "--destination",
        default=env("IMPORTER_DESTINATION_ENDPOINT"),
        help="a PVC path (a directory gets disk.img; a block device or file is written in "
        "place), or DVCR: host[:port]/repo:tag in a registry or oci:DIR:repo:tag",
    )
    parser.add_argument("--auth-config", default=env("IMPORTER_AUTH_CONFIG"))
    parser.add_argument(
        "--destination-auth-config", default=env("IMPORTER_DESTINATION_AUTH_CONFIG")
    )
    parser.add_argument("--cert-dir", default=env("IMPORTER_CERT_DIR"), help="CA certs (PEM)")
    parser.add_argument("--insecure-tls", action="store_true", default=_env_flag("INSECURE_TLS"))
    parser.add_argument(
        "--destination-insecure-tls",
        action="store_true",
        default=_env_flag("DESTINATION_INSECURE_TLS"),
    )
    parser.add_argument(
        "--checksums",
        default=env("IMPORTER_CHECKSUMS"),
        help='expected checksums: JSON {"sha256": ...} or sha256:HEX,md5:HEX',
    )
    parser.add_argument("--owner-uid", default=env("OWNER_UID", ""))
    parser.add_argument("--termination-message-path", default="/dev/termination-log")
    parser.add_argument(
        "--metrics-listen",
        default=env("IMPORTER_METRICS_LISTEN", "0.0.0.0:8443"),
        help="HOST:PORT of /metrics while the import runs; empty to disable",
    )
    parser.add_argument("--max-image-size", type=int, default=TiB)
    # Deckhouse's controller starts its importer pod with `-v=N` (klog's verbosity).
    parser.add_argument(
        "-v", type=int, default=0, metavar="N", help="accepted for Deckhouse's pods; no effect"
    )
    return parser


def parse_checksums(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        parsed = json.loads(text)
    else:
        parsed = dict(item.split(":", 1) for item in text.split(",") if item)
    unknown = set(parsed) - {"sha256", "md5"}
    if unknown:
        raise UsageError(f"unsupported checksum algorithms: {', '.join(sorted(unknown))}")
    return {k: str(v).lower() for k, v in parsed.items()}


def _ca_bundle(cert_dir: str | None) -> bytes | None:
    if not cert_dir:
        return None
    pems = [p.read_bytes() for p in sorted(Path(cert_dir).iterdir()) if p.is_file()]
    return b"\n".join(pems) or None


async def _serve_metrics(metrics: Metrics, listen: str) -> web.AppRunner | None:
    if not listen:
        return None

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    try:
        await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
    except OSError as exc:
        log.warning("cannot serve metrics on %s: %s", listen, exc)
        await runner.cleanup()
        return None
    return runner


async def _report(metrics: Metrics, uid: str, progress: Progress) -> None:
    while True:
        metrics.report(uid, progress)
        await asyncio.sleep(0.5)


async def run_import(args: argparse.Namespace, metrics: Metrics) -> TransferResult:
    if not args.source or not args.endpoint or not args.destination:
        raise UsageError(
            "--source, --endpoint and --destination (or their IMPORTER_* variables) are needed"
        )
    expected = parse_checksums(args.checksums)
    algorithms = tuple(sorted({"sha256", *expected}))
    limits = Limits(max_virtual_size=args.max_image_size)
    ca_bundle = _ca_bundle(args.cert_dir)
    open_source = source_opener(
        args.source,
        args.endpoint,
        RegistrySettings(args.auth_config, ca_bundle, args.insecure_tls),
    )
    destination = Destination(
        args.destination,
        RegistrySettings(args.destination_auth_config, ca_bundle, args.destination_insecure_tls),
        limits,
    )

    def options_for(source: OpenedSource) -> PipelineOptions:
        return PipelineOptions(
            algorithms=algorithms,
            expected_checksums=expected,
            expected_length=source.length,
            max_received_bytes=args.max_image_size,
        )

    progress = Progress()
    reporter = asyncio.create_task(_report(metrics, args.owner_uid, progress))
    try:
        return await run_transfer(open_source, destination.open_sink, options_for, progress)
    finally:
        reporter.cancel()
        metrics.report(args.owner_uid, progress)
        await destination.close()


def termination_message(
    result: TransferResult | None, error: str, duration: float
) -> dict[str, Any]:
    message: dict[str, Any] = {"duration": round(duration, 3), "error-message": error}
    if result is not None:
        message.update(
            {
                "source-image-size": result.received_bytes,
                "source-image-virtual-size": result.image.virtual_size,
                "source-image-format": result.image.format,
                "average-speed": int(result.received_bytes / duration) if duration else 0,
                "checksum": result.checksums,
            }
        )
    return message


def _write_termination(path: str, message: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(message))
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)


async def _main(args: argparse.Namespace) -> int:
    metrics = Metrics()
    runner = await _serve_metrics(metrics, args.metrics_listen)
    started = time.monotonic()
    result, error, code = None, "", EXIT_OK
    try:
        result = await run_import(args, metrics)
    except UsageError as exc:
        error, code = str(exc), EXIT_USAGE
    except TransferError as exc:
        error, code = f"{exc.reason}: {exc.message}", EXIT_FAILED
    finally:
        if runner is not None:
            await runner.cleanup()
    _write_termination(
        args.termination_message_path,
        termination_message(result, error, time.monotonic() - started),
    )
    if error:
        print(f"dvcr-importer: {error}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except UsageError as exc:
        print(f"dvcr-importer: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
