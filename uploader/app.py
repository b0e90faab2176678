"""The server: one aiohttp application for the control API, upload URLs, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from importer.metrics import CONTENT_TYPE_LATEST, Metrics
from uploader import api, upload
from uploader.config import ServerConfig, split_host_port
from uploader.errors import error_middleware
from uploader.images import ImageController
from uploader.store import Store
from uploader.tokens import redact_path

log = logging.getLogger("dvcr-uploader")
METRICS = web.AppKey("metrics", Metrics)
# Bodies of control requests are small manifests; upload bodies are streamed, never read whole.
MAX_MANIFEST_SIZE = 4 << 20
SHUTDOWN_GRACE = 3.0  # seconds


class AccessLogger(AbstractAccessLogger):
    """One line per request, with upload tokens cut short."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %.3fs',
            request.remote,
            request.method,
            redact_path(request.path),
            response.status,
            time,
        )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(config: ServerConfig) -> web.Application:
    """The application; its controller starts when the app starts (see `run_server`)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_MANIFEST_SIZE)
    metrics = Metrics()
    store = Store(config.db_path)
    app[METRICS] = metrics
    app[api.CONTROLLER] = ImageController(config, store, metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    api.add_routes(app)
    upload.add_routes(app)

    async def stop_transfers(app: web.Application) -> None:
        # Before aiohttp waits for open requests: watches and uploads end now, not later.
        store.end_watches()
        await app[api.CONTROLLER].stop()

    async def close(app: web.Application) -> None:
        store.close()

    app.on_shutdown.append(stop_transfers)
    app.on_cleanup.append(close)
    return app


def metrics_app(metrics: Metrics) -> web.Application:
    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    return app


def _ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


async def run_server(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    """Serves until SIGINT/SIGTERM."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    app = build_app(config)
    runner = web.AppRunner(app, access_log_class=AccessLogger, handler_cancellation=False)
    await runner.setup()
    host, port = split_host_port(config.listen)
    site = web.TCPSite(
        runner,
        host,
        port,
        ssl_context=_ssl_context(config),
        reuse_address=True,
        backlog=512,
        # Transfers are stopped before this wait; what is left is a request body still
        # being drained after its answer, which must not hold a stop for long.
        shutdown_timeout=SHUTDOWN_GRACE,
    )
    await site.start()
    bound_port = runner.addresses[0][1]
    await app[api.CONTROLLER].start(config.own_base_url(bound_port))
    runners = [runner]
    if config.metrics_listen:
        metrics_runner = web.AppRunner(metrics_app(app[METRICS]), access_log=None)
        await metrics_runner.setup()
        m_host, m_port = split_host_port(config.metrics_listen)
        await web.TCPSite(metrics_runner, m_host, m_port).start()
        runners.append(metrics_runner)
    log.info(
        "serving on %s (data in %s, DVCR %s)",
        config.own_base_url(bound_port),
        config.data_dir.resolve(),
        config.dvcr or f"OCI layout {config.data_dir / 'dvcr'}",
    )
    print(f"dvcr-uploader: serving on {config.own_base_url(bound_port)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping")
    for r in reversed(runners):
        await r.cleanup()
