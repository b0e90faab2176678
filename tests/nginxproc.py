"""A real nginx serving a directory on a loopback port, for import tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from serverproc import free_port
from waiting import wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

CONFIG = """\
{user}
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port};
        {server}
    }}
}}
"""
TLS = "listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};"


class Nginx:
    def __init__(
        self, root: Path, tls: tuple[Path, Path] | None = None, server: str | None = None
    ) -> None:
        """`tls` (certificate, key) adds an HTTPS listener at `https_url`. `server`, when
        given, is the server block's configuration instead of serving `files`."""
        self.root = root
        self._server = server
        self.files = root / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tls_port = free_port() if tls else 0
        self.https_url = f"https://127.0.0.1:{self.tls_port}"
        self._tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        config = self.root / "nginx.conf"
        # Workers read the test's private temp dir, so they run as whoever runs the test.
        user = "user root;" if os.geteuid() == 0 else ""
        server = self._server
        if server is None:
            server = f"root {self.files};"
            if self._tls:
                tls = TLS.format(port=self.tls_port, cert=self._tls[0], key=self._tls[1])
                server = f"{tls}\n{server}"
        config.write_text(CONFIG.format(user=user, root=self.root, port=self.port, server=server))
        self.proc = subprocess.Popen([NGINX, "-c", str(config), "-p", str(self.root)])
        try:
            wait_until(self._answers, timeout=10, interval=0.05, what="nginx to answer")
        except AssertionError:
            raise RuntimeError((self.root / "error.log").read_text()) from None
        return self

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.url + "/", timeout=1).close()
        except urllib.error.HTTPError:
            return True  # it answers: 403/404 on the directory is fine
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
