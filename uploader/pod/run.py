"""`dvcr-uploader` with no subcommand: Deckhouse's uploader pod, one image per process.

It starts the server's image machinery on a state directory of its own under the temp
directory (`$TMPDIR`, else `/tmp`: the pod's only writable place, an emptyDir), creates
the one image, with its destination the reference in `UPLOADER_DESTINATION_ENDPOINT`, and
serves its upload paths (uploader/pod/routes.py), `/healthz`, and `/metrics` over HTTPS
with a throwaway certificate (metricstls.py). Once the image is Ready or Failed it writes
the termination message and exits: 0 when the image is pushed, and 0 too for a verdict on
the image (invalid, unsupported, too large, checksum mismatch: sending it again cannot
help, and Deckhouse's controller reads the verdict from the message of a completed pod);
1 when the push failed for a reason that may pass, so that the kubelet starts the
container again; 2 when it is configured wrongly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from importer import lanethreads
from importer.metrics import Metrics
from uploader.pod.checksums import for_the_sink, for_the_spec, not_computable
from uploader.pod.destination import PodStorage, pod_destination
from uploader.pod.metricstls import MetricsTlsError, self_signed_context
from uploader.pod.options import OptionsError, PodOptions, parse_options
from uploader.pod.routes import healthz_app, metrics_app, requests_in_flight, uploads_app
from uploader.pod.termination import outcome_message, write_message
from uploader.pod.tls import server_context
from uploader.resources import API_VERSION, VIRTUAL_IMAGE
from uploader.server.app import ProtocolErrorsInOneLine, bind, serve_app
from uploader.server.config import ServerConfig
from uploader.server.image_db import Store
from uploader.server.image_model import FAILED, PROVISIONING, READY, Image
from uploader.server.images import Images

log = logging.getLogger("dvcr-uploader")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
IMAGE_NAMESPACE, IMAGE_NAME = "pod", "upload"
# Failures that are a verdict on the image itself: the same bytes fail again.
VERDICTS = frozenset({"InvalidImage", "UnsupportedFormat", "ImageTooLarge", "BadImageChecksum"})
HEADER_TIMEOUT = 30.0
LANE_THREADS = 16
ANSWER_GRACE = 10.0  # seconds the verdict's answer may take to go out before the exit


class StartError(Exception):
    """The pod cannot start; the message says why."""


def _manifest(options: PodOptions) -> dict[str, Any]:
    in_the_spec = for_the_spec(options.checksums)
    upload: dict[str, Any] = {"checksum": in_the_spec} if in_the_spec else {}
    return {
        "apiVersion": API_VERSION,
        "kind": VIRTUAL_IMAGE.name,
        "metadata": {"name": IMAGE_NAME, "namespace": IMAGE_NAMESPACE},
        "spec": {
            "storage": "ContainerRegistry",
            "dataSource": {"type": "Upload", "upload": upload},
        },
    }


async def _create_image(images: Images, options: PodOptions) -> Image:
    created = await images.lifecycle.create(VIRTUAL_IMAGE, IMAGE_NAMESPACE, _manifest(options))
    image = Image(created)
    if options.owner_uid:
        # The metrics' ownerUID label is the image's uid: the pod's image is the owner's.
        stored = images.store.get(image.key)
        assert stored is not None
        stored["metadata"]["uid"] = options.owner_uid
        image = Image(images.store.save(stored))
    if image.upload_token is None:
        raise StartError(f"the image is {image.phase}, not waiting for its upload")
    return image


async def _verdict(store: Store, image: Image) -> tuple[dict[str, Any], float | None]:
    """The image once Ready or Failed, and when its upload began (monotonic)."""
    began: float | None = None
    async for event in store.watch(VIRTUAL_IMAGE.name, IMAGE_NAMESPACE, IMAGE_NAME):
        phase = event.object.get("status", {}).get("phase")
        if phase == PROVISIONING and began is None:
            began = time.monotonic()
        if phase in (READY, FAILED):
            return event.object, began
    raise StartError("the image was removed")


def _bind_all(options: PodOptions) -> dict[str, socket.socket]:
    wanted = {
        "LISTEN_ADDRESS/LISTEN_PORT": options.listen,
        "HEALTHZ_PORT": options.healthz_listen,
    }
    if options.metrics_listen:
        wanted["UPLOADER_METRICS_LISTEN"] = options.metrics_listen
    sockets: dict[str, socket.socket] = {}
    for what, address in wanted.items():
        try:
            sockets[what] = bind(address)
        except OSError as exc:
            for sock in sockets.values():
                sock.close()
            raise StartError(f"{what}: cannot listen on {address}: {exc.strerror}") from None
    return sockets


async def _wait_for_answers(app: web.Application) -> None:
    deadline = time.monotonic() + ANSWER_GRACE
    while requests_in_flight(app) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


async def _run_image(options: PodOptions, state_dir: Path, tls: ssl.SSLContext | None) -> int:
    destination = pod_destination(options)
    sockets = _bind_all(options)
    config = ServerConfig(
        listen=options.listen,
        data_dir=state_dir,
        tls_cert=options.cert_file,
        tls_key=options.key_file,
        wait_for_upload_timeout=0,  # the controller has its own deadline for the pod
        header_timeout=HEADER_TIMEOUT,
        lane_threads=LANE_THREADS,
    )
    lanethreads.configure(config.lane_threads)
    logging.getLogger("aiohttp.server").addFilter(ProtocolErrorsInOneLine())
    metrics = Metrics()
    store = Store(config.db_path)
    storage = PodStorage(config, destination, for_the_sink(options.checksums))
    images = Images(config, store, metrics, storage)
    runners: list[web.AppRunner] = []
    try:
        await images.start(
            config.own_base_url(sockets["LISTEN_ADDRESS/LISTEN_PORT"].getsockname()[1])
        )
        image = await _create_image(images, options)
        assert image.upload_token is not None
        uploads = uploads_app(images.uploads, image.upload_token, options.client_name)
        listen = sockets.pop("LISTEN_ADDRESS/LISTEN_PORT")
        runners.append(await serve_app(uploads, listen, config, tls))
        healthz = sockets.pop("HEALTHZ_PORT")
        runners.append(await serve_app(healthz_app(), healthz, config, None, access_log=False))
        if "UPLOADER_METRICS_LISTEN" in sockets:
            metrics_tls = self_signed_context(state_dir)
            metrics_runner = await serve_app(
                metrics_app(metrics),
                sockets.pop("UPLOADER_METRICS_LISTEN"),
                config,
                metrics_tls,
                access_log=False,
            )
            runners.append(metrics_runner)
        log.info(
            "Starting uploader on %s (%s), pushing to %s",
            options.listen,
            "https" if tls else "http",
            destination.reference,
        )
        print(f"dvcr-uploader: serving uploads on {options.listen}", flush=True)
        created = time.monotonic()
        stop = asyncio.Event()
        _stop_on_signals(stop)
        verdict = asyncio.ensure_future(_verdict(store, image))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({verdict, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not verdict.done():
            verdict.cancel()
            log.info("Shutting down: stopped before an upload was complete")
            return EXIT_OK
        final, began = verdict.result()
        duration = time.monotonic() - (began if began is not None else created)
        received = store.received(image.key)
        write_message(options.termination_message_path, outcome_message(final, received, duration))
        await _wait_for_answers(uploads)
        reason = Image(final).ready_condition() or {}
        if final["status"]["phase"] == READY:
            log.info("the image is pushed to %s", destination.reference)
            return EXIT_OK
        log.error("the upload failed: %s: %s", reason.get("reason"), reason.get("message"))
        return EXIT_OK if reason.get("reason") in VERDICTS else EXIT_FAILED
    finally:
        for sock in sockets.values():
            sock.close()
        for runner in reversed(runners):
            await runner.cleanup()
        await images.stop()
        store.close()


def _refuse_uncheckable(options: PodOptions) -> bool:
    """A checksum this pod cannot compute fails the image at once: a verdict for the
    controller (exit 0) rather than an image taken unchecked or a pod restarted forever."""
    algorithms = not_computable(options.checksums)
    if not algorithms:
        return False
    message = (
        f"UnsupportedChecksum: UPLOADER_CHECKSUMS asks for {', '.join(algorithms)}, which this "
        "uploader cannot compute (it checks md5, sha1, sha256 and sha512); give one of those"
    )
    log.error("%s", message)
    write_message(options.termination_message_path, {"error-message": message})
    return True


async def run_pod(options: PodOptions) -> int:
    if _refuse_uncheckable(options):
        return EXIT_OK
    tls = server_context(options)
    state_dir = Path(tempfile.mkdtemp(prefix="dvcr-uploader-", dir=tempfile.gettempdir()))
    try:
        return await _run_image(options, state_dir, tls)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    try:
        options = parse_options(argv, os.environ if environ is None else environ)
    except OptionsError as exc:
        print(f"dvcr-uploader: {exc}", file=sys.stderr)
        return EXIT_USAGE
    level = logging.DEBUG if options.verbosity >= 3 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return asyncio.run(run_pod(options))
    except (OptionsError, StartError, MetricsTlsError) as exc:
        print(f"dvcr-uploader: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
