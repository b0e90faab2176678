"""Server configuration: flags of `dvcr-uploader serve` and the embedded defaults."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from importer.formats.base import TiB

DEFAULT_LISTEN = "127.0.0.1:8444"


def split_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[v6]:PORT`."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def is_loopback_host(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1; an empty host (every address) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = Path("./dvcr-data")
    dvcr: str | None = None  # a registry URL; None: the embedded OCI layout
    dvcr_auth_config: Path | None = None  # dockerconfigjson with the registry's credentials
    dvcr_ca_bundle: Path | None = None
    dvcr_insecure: bool = False
    external_url: str | None = None
    in_cluster_url: str | None = None
    metrics_listen: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_image_size: int = 1 * TiB
    # Checksums computed for every transfer; md5 is added per image when its spec asks.
    checksums: tuple[str, ...] = ("sha256",)
    status_interval: float = 0.5  # seconds between progress updates of a transfer
    # An upload that broke off waits this long, with all it took, for a request to continue.
    upload_grace: float = 15 * 60
    # A request that delivers nothing for this long is cut; the upload stays resumable.
    upload_idle_timeout: float = 120
    # PVC uploads save where they stand this often, to continue from there after a restart.
    checkpoint_every: int = 256 << 20
    # An image that waits for its upload longer than this fails (0: forever).
    wait_for_upload_timeout: float = 24 * 3600
    # Access: the API on a listener of its own, and who may use it (uploader/server/access.py).
    api_listen: str | None = None
    api_token_file: Path | None = None
    # Address ranges imports may reach beyond what the server allows by default.
    import_allow: tuple[str, ...] = ()
    # A connection that has not sent a whole request head within this time is closed.
    header_timeout: float = 30
    max_images_per_namespace: int = 5000
    max_images: int = 50000
    # Threads shared by the lanes (hashes, writes) of all transfers: a parked upload holds
    # none, and a crowd of uploads cannot make the server start one thread per lane.
    lane_threads: int = 64
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def own_base_url(self, port: int | None = None, address: str | None = None) -> str:
        """The URL of the listener on `address` (default: `--listen`), as this machine
        reaches it."""
        host, listen_port = split_host_port(address or self.listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{port or listen_port}"

    @property
    def listeners(self) -> list[str]:
        return [a for a in (self.listen, self.api_listen, self.metrics_listen) if a]

    @property
    def loopback_only(self) -> bool:
        """Every listener is on loopback: only this machine reaches the server."""
        return all(is_loopback_host(split_host_port(a)[0]) for a in self.listeners)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def pvc_root(self) -> Path:
        return self.data_dir / "pvc"
