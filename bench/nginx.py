"""nginx as the baseline for "HTTP PUT to disk": WebDAV PUT into a directory.

The configuration is generated into the run's directory; nginx runs in the foreground
(`daemon off`) as root, with its pid file, logs and request body buffers under its prefix,
so a PUT is written to a body file on the target's filesystem and renamed into place.
`workers` is nginx's `worker_processes`: 1 by default, nginx's built-in default, as one
upload is served by one worker either way; scenarios with uploads at once use `auto`
(Debian's packaged nginx.conf; one per CPU), so nginx may use every core as ours does.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

from bench.process import ChildProcess, ServerProcess, free_port

CONFIG = """\
daemon off;
master_process on;
worker_processes {workers};
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 64;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            client_max_body_size 0;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if path is None:
        raise SystemExit("nginx is not installed (apt-get install -y nginx-light)")
    return path


class Nginx(ServerProcess):
    """One nginx on a loopback port; PUT /PATH lands in `root/PATH`."""

    def __init__(self, prefix: Path, workers: int | str = 1) -> None:
        self.prefix = prefix
        self.workers = workers
        self.root = prefix / "root"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: ChildProcess | None = None

    def config(self) -> str:
        return CONFIG.format(
            prefix=self.prefix, root=self.root, port=self.port, workers=self.workers
        )

    def start(self) -> Nginx:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.prefix / "body").mkdir(exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(self.config())
        argv = [
            nginx_binary(),
            "-p",
            str(self.prefix),
            "-c",
            str(conf),
            "-e",
            str(self.prefix / "error.log"),
        ]
        self.process = ChildProcess("nginx", argv, self.prefix / "nginx.out")
        self.process.start(self._answers)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer: it is serving
        except OSError:
            return False

    def worker_pid(self) -> int:
        """A worker process that serves requests (nginx's master only supervises); the
        only one with `workers` 1."""
        if self.process is None:
            raise RuntimeError("nginx is not running")
        master = self.process.pid
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if not children:
            raise RuntimeError("nginx has no worker process")
        return int(children[0])

    def target(self, relative: str) -> tuple[str, Path]:
        """The URL to PUT to and the file it becomes."""
        return f"{self.url}/{relative}", self.root / relative
