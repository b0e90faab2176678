"""The server: the control API, upload URLs, health and metrics, on one listener or on
two (`--api-listen`: the API and `/metrics` on their own, so an ingress that publishes the
upload listener publishes nothing else)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import ssl
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from importer import lanethreads
from importer.metrics import CONTENT_TYPE_LATEST, Metrics
from uploader.errors import error_middleware
from uploader.quoting import cut
from uploader.server import cdi_api, control_api, upload_api, web_page
from uploader.server.access import AccessConfigError, AccessControl
from uploader.server.access_check import ACCESS, access_middleware
from uploader.server.config import ServerConfig, split_host_port
from uploader.server.headdeadline import HeadDeadlineSite, head_received_middleware
from uploader.server.image_db import Store
from uploader.server.images import Images
from uploader.server.lingering import lingering_close_middleware
from uploader.server.manifests import MAX_MANIFEST_SIZE
from uploader.server.upload_tokens import redact_path

log = logging.getLogger("dvcr-uploader")
METRICS = web.AppKey("metrics", Metrics)
SHUTDOWN_GRACE = 3.0  # seconds
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_for_log(text: str) -> str:
    """Control characters as \\xNN, so a request cannot write lines of its own in the log."""
    return _CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class ProtocolErrorsInOneLine(logging.Filter):
    """aiohttp logs a request it cannot parse with a traceback: a hostile client would
    write a dozen log lines per request. One line, escaped and cut, says what was wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            what = escape_for_log(cut(" ".join(str(error.message).split())))
            record.msg, record.args = "%s: %s", (record.getMessage(), what)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class AccessLogger(AbstractAccessLogger):
    """One line per request, with upload tokens cut short and control characters escaped."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %.3fs',
            request.remote,
            escape_for_log(request.method),
            escape_for_log(redact_path(request.path)),
            response.status,
            time,
        )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class StartError(Exception):
    """The server cannot start as configured; the message says what to change."""


@dataclass
class ServerApps:
    """The applications of one server; `api` is None when the uploads' one serves it all."""

    uploads: web.Application
    api: web.Application | None
    images: Images
    metrics: Metrics


def _new_app(access: AccessControl | None, metrics: Metrics) -> web.Application:
    """`access`: this application serves the API, guarded by it."""
    app = web.Application(
        middlewares=[
            head_received_middleware,
            lingering_close_middleware,
            error_middleware,
            access_middleware,
        ],
        client_max_size=MAX_MANIFEST_SIZE,
    )
    if access is not None:
        app[ACCESS] = access
    app[METRICS] = metrics
    app.router.add_get("/healthz", healthz)
    return app


def build_apps(config: ServerConfig, access: AccessControl) -> ServerApps:
    """The applications; the images start in `run_server`, before they listen."""
    metrics = Metrics()
    store = Store(config.db_path)
    images = Images(config, store, metrics)
    api_app = _new_app(access, metrics) if config.api_listen else None
    uploads = _new_app(None if api_app else access, metrics)
    serving_api = api_app or uploads
    serving_api[control_api.IMAGES] = images.lifecycle
    uploads[upload_api.UPLOADS] = images.uploads
    serving_api.router.add_get("/metrics", metrics_handler)
    control_api.add_routes(serving_api)
    web_page.add_routes(serving_api)
    upload_api.add_routes(uploads)
    cdi_api.add_routes(uploads)

    async def stop_transfers(app: web.Application) -> None:
        # Before aiohttp waits for open requests: watches and uploads end now, not later.
        store.end_watches()
        await images.stop()

    async def close(app: web.Application) -> None:
        store.close()

    uploads.on_shutdown.append(stop_transfers)
    uploads.on_cleanup.append(close)
    return ServerApps(uploads, api_app, images, metrics)


def metrics_app(metrics: Metrics, access: AccessControl) -> web.Application:
    app = _new_app(access, metrics)
    app.router.add_get("/metrics", metrics_handler)
    return app


def _ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def bind(address: str) -> socket.socket:
    """A socket bound to HOST:PORT but not yet listening: connections are refused until
    the server is ready for them."""
    host, port = split_host_port(address)
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = info[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def serve_app(
    app: web.Application,
    sock: socket.socket,
    config: ServerConfig,
    tls: ssl.SSLContext | None,
    access_log: bool = True,
) -> web.AppRunner:
    """Serves `app` on `sock` with the server's header deadline (the uploader pod's
    listeners too)."""
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=log if access_log else None,
        handler_cancellation=False,
        keepalive_timeout=config.header_timeout,
    )
    await runner.setup()
    site = HeadDeadlineSite(
        runner,
        sock,
        header_timeout=config.header_timeout,
        ssl_context=tls,
        backlog=512,
        # Transfers are stopped before this wait; what is left is a request body still
        # being drained after its answer, which must not hold a stop for long.
        shutdown_timeout=SHUTDOWN_GRACE,
    )
    await site.start()
    return runner


async def run_server(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    """Serves until SIGINT/SIGTERM; SIGHUP reads the token file again."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        access = AccessControl.for_server(
            config.api_token_file, config.data_dir, config.loopback_only
        )
    except AccessConfigError as exc:
        raise StartError(str(exc)) from None
    sockets: dict[str, socket.socket] = {}
    for name, address in (
        ("listen", config.listen),
        ("api", config.api_listen),
        ("metrics", config.metrics_listen),
    ):
        if address:
            try:
                sockets[name] = bind(address)
            except OSError as exc:
                raise StartError(f"cannot listen on {address}: {exc.strerror}") from None
    lanethreads.configure(config.lane_threads)
    logging.getLogger("aiohttp.server").addFilter(ProtocolErrorsInOneLine())
    apps = build_apps(config, access)
    bound_port = sockets["listen"].getsockname()[1]
    # Every image is back in a steady state before the first request is taken.
    await apps.images.start(config.own_base_url(bound_port))
    tls = _ssl_context(config)
    runners = [await serve_app(apps.uploads, sockets["listen"], config, tls)]
    if apps.api is not None:
        runners.append(await serve_app(apps.api, sockets["api"], config, tls))
    if "metrics" in sockets:
        metrics = metrics_app(apps.metrics, access)
        runners.append(await serve_app(metrics, sockets["metrics"], config, None, access_log=False))
    api_port = sockets["api"].getsockname()[1] if "api" in sockets else bound_port
    log.info(
        "serving uploads on %s, the API on %s (%s; data in %s, DVCR %s)",
        config.own_base_url(bound_port),
        config.own_base_url(api_port, config.api_listen),
        "open to this machine" if access.open else "bearer tokens needed",
        config.data_dir.resolve(),
        config.dvcr or f"OCI layout {config.data_dir / 'dvcr'}",
    )
    print(f"dvcr-uploader: serving on {config.own_base_url(bound_port)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, access.reload)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping")
    for r in reversed(runners):
        await r.cleanup()
