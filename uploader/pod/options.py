"""The uploader pod's configuration: Deckhouse's flags, each defaulting to its environment
variable, as Deckhouse's `dvcr-uploader` binary reads them (docs/uploader-pod.md lists
them all).

Deckhouse's binary falls back to the default on a value it cannot parse; here a malformed
value stops the start with a message that names the variable, since a pod that listens
on another port than its Service, or pushes without the TLS checks it was told to make,
is worse than a pod that does not start. An empty value counts as unset, as the
controller sets some variables to "" when it has nothing to say.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from importer.oci.reference import InvalidReference, Reference

DEFAULT_LISTEN_ADDRESS = "0.0.0.0"
DEFAULT_LISTEN_PORT = 8444
DEFAULT_HEALTHZ_PORT = 8080
DEFAULT_METRICS_LISTEN = "0.0.0.0:8443"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
ENDPOINT_VARIABLE = "UPLOADER_DESTINATION_ENDPOINT"
ENDPOINT_FLAG = "--destination-endpoint"

# Go's strconv.ParseBool, which Deckhouse's binary uses.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", re.ASCII)
# The algorithms of the controller's checksum section (datasource.Checksums), and the
# length of each digest in hex.
_HEX_LENGTHS = {
    "md5": 32,
    "sha1": 40,
    "sha256": 64,
    "sha512": 128,
    "streebog256": 64,
    "streebog512": 128,
}


def is_pod_invocation(
    argv: Sequence[str], environ: Mapping[str, str], commands: Collection[str]
) -> bool:
    """No subcommand, and the destination given, by its variable or its flag."""
    if any(arg in commands for arg in argv):
        return False
    flagged = any(arg == ENDPOINT_FLAG or arg.startswith(ENDPOINT_FLAG + "=") for arg in argv)
    return flagged or bool(environ.get(ENDPOINT_VARIABLE))


class OptionsError(Exception):
    """A flag or variable that cannot be used; the message names it."""


@dataclass(frozen=True)
class Source:
    """Where a value came from, for messages: `LISTEN_PORT` or `--listen-port`."""

    flag: str
    variable: str | None


@dataclass
class PodOptions:
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    listen_port: int = DEFAULT_LISTEN_PORT
    healthz_port: int = DEFAULT_HEALTHZ_PORT
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    client_name: str = ""
    ciphers: tuple[str, ...] = ()
    min_tls_version: str = ""
    destination: Reference | None = None
    destination_username: str = ""
    destination_password: str = field(default="", repr=False)
    destination_auth_config: Path | None = None
    destination_insecure: bool = False
    destination_ca_bundle: Path | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    owner_uid: str = ""
    verbosity: int = 0
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    termination_message_path: Path = Path(DEFAULT_TERMINATION_MESSAGE_PATH)

    @property
    def listen(self) -> str:
        host = self.listen_address
        return f"[{host}]:{self.listen_port}" if ":" in host else f"{host}:{self.listen_port}"

    @property
    def healthz_listen(self) -> str:
        # Deckhouse's binary listens for /healthz on every address (":PORT").
        return f"0.0.0.0:{self.healthz_port}"


_SOURCES: dict[str, Source] = {
    "listen_address": Source("--listen-address", "LISTEN_ADDRESS"),
    "listen_port": Source("--listen-port", "LISTEN_PORT"),
    "healthz_port": Source("--healthz-port", "HEALTHZ_PORT"),
    "cert_file": Source("--server-cert", "TLS_CERT_FILE"),
    "key_file": Source("--server-key", "TLS_KEY_FILE"),
    "client_ca_file": Source("--client-ca", "CLIENT_CA_FILE"),
    "client_name": Source("--client-name", "CLIENT_NAME"),
    "ciphers": Source("--tls-ciphers", "TLS_CIPHERS"),
    "min_tls_version": Source("--tls-min-version", "TLS_MIN_VERSION"),
    "destination": Source(ENDPOINT_FLAG, ENDPOINT_VARIABLE),
    "destination_username": Source(
        "--destination-access-key-id", "UPLOADER_DESTINATION_ACCESS_KEY_ID"
    ),
    "destination_password": Source("--destination-secret-key", "UPLOADER_DESTINATION_SECRET_KEY"),
    "destination_auth_config": Source(
        "--destination-auth-config", "UPLOADER_DESTINATION_AUTH_CONFIG"
    ),
    "destination_insecure": Source("--destination-insecure-tls", "DESTINATION_INSECURE_TLS"),
    "destination_ca_bundle": Source("--destination-ca-bundle", "UPLOADER_DESTINATION_CA_BUNDLE"),
    "checksums": Source("--checksums", "UPLOADER_CHECKSUMS"),
    "owner_uid": Source("--owner-uid", "OWNER_UID"),
    "metrics_listen": Source("--metrics-listen", "UPLOADER_METRICS_LISTEN"),
    "termination_message_path": Source("--termination-message-path", None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvcr-uploader",
        description="Deckhouse's uploader pod: receive one image and push it to the DVCR "
        f"reference in {ENDPOINT_VARIABLE}; every flag defaults to its variable.",
    )
    for dest, source in _SOURCES.items():
        helptext = f"env {source.variable}" if source.variable else None
        if dest == "destination_insecure":
            parser.add_argument(source.flag, dest=dest, nargs="?", const="true", help=helptext)
        else:
            parser.add_argument(source.flag, dest=dest, help=helptext)
    parser.add_argument("-v", "--v", dest="verbosity", default="0", help="log verbosity")
    return parser


def _number(text: str, what: str, low: int, high: int) -> int:
    value = text.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 6 or int(value) > high:
        raise OptionsError(f"{what}: {value[:64]!r} is not a number from {low} to {high}")
    if int(value) < low:
        raise OptionsError(f"{what}: {value!r} is not a number from {low} to {high}")
    return int(value)


def _port(text: str, what: str) -> int:
    return _number(text, what, 0, 65535)


def _boolean(text: str, what: str) -> bool:
    value = text.strip()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise OptionsError(f"{what}: {value[:64]!r} is not a boolean (true or false)")


def _address(text: str, what: str) -> str:
    host = text.strip().strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host):
        raise OptionsError(f"{what}: {text[:64]!r} is not an IP address or a host name")
    return host


def _readable_file(text: str, what: str, directory_too: bool = False) -> Path:
    path = Path(text)
    if "\x00" in text:
        raise OptionsError(f"{what}: the path holds a NUL byte")
    if directory_too and path.is_dir():
        return path
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise OptionsError(f"{what}: cannot read {text[:200]!r}: {exc.strerror}") from None
    if not path.is_file():
        raise OptionsError(f"{what}: {text[:200]!r} is not a regular file")
    return path


def parse_checksums(text: str, what: str) -> dict[str, str]:
    """`algorithm:hex` pairs, comma separated, as Deckhouse's controller writes them
    (`md5:…,sha256:…`, sorted, digests in lower case); upper-case digests are taken too."""
    checksums: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        algorithm, sep, value = item.partition(":")
        algorithm, value = algorithm.strip().lower(), value.strip().lower()
        if not sep or not algorithm or not value:
            raise OptionsError(f"{what}: {item[:80]!r} is not ALGORITHM:HEX")
        length = _HEX_LENGTHS.get(algorithm)
        if length is None:
            raise OptionsError(
                f"{what}: the algorithm {algorithm[:20]!r} is not one of {', '.join(_HEX_LENGTHS)}"
            )
        if len(value) != length or not re.fullmatch(r"[0-9a-f]+", value):
            raise OptionsError(f"{what}: the {algorithm} checksum is not {length} hex digits")
        if checksums.get(algorithm, value) != value:
            raise OptionsError(f"{what}: two different {algorithm} checksums")
        checksums[algorithm] = value
    return checksums


def _metrics_listen(text: str, what: str) -> str:
    if not text.strip():
        return ""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        raise OptionsError(f"{what}: {text[:64]!r} is not HOST:PORT")
    return f"{_address(host or '0.0.0.0', what)}:{_port(port, what)}"


def _reference(text: str, what: str) -> Reference:
    value = text.strip()
    if value.startswith(("docker://", "http://", "https://")):
        raise OptionsError(f"{what}: {value[:200]!r}: give host[:port]/repository:tag")
    try:
        reference = Reference.parse(value)
    except InvalidReference as exc:
        raise OptionsError(f"{what}: {exc}") from None
    if reference.digest is not None or ":" not in value.rsplit("/", 1)[-1]:
        raise OptionsError(f"{what}: {value[:200]!r} needs a tag (host[:port]/repository:tag)")
    if "/" not in value.split("@", 1)[0]:
        raise OptionsError(f"{what}: {value[:200]!r} names no registry host")
    return reference


def _raw_values(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Each option that was given: its text and the name it was given under."""
    given: dict[str, tuple[str, str]] = {}
    for dest, source in _SOURCES.items():
        flag_value: str | None = getattr(args, dest)
        if flag_value is not None:
            given[dest] = (flag_value, source.flag)
        elif source.variable is not None and environ.get(source.variable, "") != "":
            given[dest] = (environ[source.variable], source.variable)
    return given


def parse_options(argv: Sequence[str], environ: Mapping[str, str]) -> PodOptions:
    """The options of flags `argv` and variables `environ`; OptionsError names the first
    one that cannot be used."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        if exc.code == 0:
            raise
        raise OptionsError("the command line is not valid (see dvcr-uploader --help)") from None
    given = _raw_values(args, environ)
    options = PodOptions(verbosity=_number(args.verbosity, "-v", 0, 10))
    for dest, (text, what) in given.items():
        _apply(options, dest, text, what)
    if options.destination is None:
        raise OptionsError(f"{ENDPOINT_FLAG} ({ENDPOINT_VARIABLE}) is required")
    _check_combinations(options)
    return options


def _apply(options: PodOptions, dest: str, text: str, what: str) -> None:
    if dest == "listen_address":
        options.listen_address = _address(text, what)
    elif dest == "listen_port":
        options.listen_port = _port(text, what)
    elif dest == "healthz_port":
        # Deckhouse's binary serves /healthz on its default port when given 0.
        options.healthz_port = _port(text, what) or DEFAULT_HEALTHZ_PORT
    elif dest in ("cert_file", "key_file", "client_ca_file", "destination_auth_config"):
        setattr(options, dest, _readable_file(text, what))
    elif dest == "destination_ca_bundle":
        options.destination_ca_bundle = _readable_file(text, what, directory_too=True)
    elif dest == "ciphers":
        options.ciphers = tuple(name.strip() for name in text.split(",") if name.strip())
    elif dest == "destination":
        options.destination = _reference(text, what)
    elif dest == "destination_insecure":
        options.destination_insecure = _boolean(text, what)
    elif dest == "checksums":
        options.checksums = parse_checksums(text, what)
    elif dest == "metrics_listen":
        options.metrics_listen = _metrics_listen(text, what)
    elif dest == "termination_message_path":
        if not text.strip() or "\x00" in text:
            raise OptionsError(f"{what}: {text[:200]!r} is not a path")
        options.termination_message_path = Path(text)
    else:
        setattr(options, dest, text.strip())


def _check_combinations(options: PodOptions) -> None:
    """The rules of Deckhouse's binary about which TLS options go together."""
    if options.cert_file is None and options.key_file is None:
        if options.client_ca_file is not None or options.client_name:
            raise OptionsError(
                "CLIENT_CA_FILE/CLIENT_NAME (mTLS) need TLS_CERT_FILE and TLS_KEY_FILE"
            )
        return
    if options.cert_file is None or options.key_file is None:
        raise OptionsError("TLS_CERT_FILE and TLS_KEY_FILE go together: set both or neither")
    if options.client_name and options.client_ca_file is None:
        raise OptionsError("CLIENT_NAME needs CLIENT_CA_FILE")
