"""`dvcr-uploader`: the server (`serve`) and a kubectl-like client for its images."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import sys
from pathlib import Path
from typing import Any

from uploader.argtypes import (
    cidr,
    existing_file,
    host_port,
    parse_bool,
    parse_duration,
    parse_size,
    positive_int,
)
from uploader.client import apply_command, delete_command, get_command, printers, wait_command
from uploader.client.api_client import ApiClient, ClientError
from uploader.client.applyinput import ManifestError
from uploader.client.credentials import Credentials, CredentialsError, resolve_credentials
from uploader.client.targets import parse_targets
from uploader.client.upload_create import DEFAULT_STORAGE, STORAGES
from uploader.pod.options import is_pod_invocation
from uploader.server.config import DEFAULT_LISTEN, ServerConfig

__all__ = ["build_parser", "main", "parse_duration", "parse_size"]

DEFAULT_SERVER = "http://127.0.0.1:8444"


def _version() -> str:
    try:
        return importlib.metadata.version("dvcr-uploader")
    except importlib.metadata.PackageNotFoundError:
        import uploader

        return str(getattr(uploader, "__version__", "unknown"))


def _client_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The flags of every command that talks to the API; given before the command or
    after it (`suppress`: the command's copy sets nothing unless given)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--server",
        default=default(os.environ.get("DVCR_SERVER", DEFAULT_SERVER)),
        help=f"server URL (default {DEFAULT_SERVER}, env DVCR_SERVER)",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default=default(None),
        help="namespace (default: default; a manifest's own namespace for -f)",
    )
    parser.add_argument(
        "--token",
        default=default(None),
        help="bearer token for the API; else env DVCR_TOKEN, else the file env "
        "DVCR_TOKEN_FILE names (the server's own: DATA_DIR/admin.token)",
    )
    parser.add_argument(
        "--certificate-authority",
        type=existing_file,
        default=default(None),
        metavar="FILE",
        help="PEM file of the CA that signed the server's certificate",
    )
    parser.add_argument(
        "--insecure-skip-tls-verify",
        action="store_true",
        default=default(False),
        help="do not check the server's certificate (the connection can be intercepted)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvcr-uploader",
        description="Virtual machine images into DVCR or volumes: the server and its client.",
    )
    parser.add_argument(
        "--version", action="version", version=f"dvcr-uploader {_version()}", help="show version"
    )
    _client_flags(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _client_flags(common, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server")
    _serve_flags(serve)
    _client_commands(commands, common)
    return parser


def _serve_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--listen",
        type=host_port,
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"HOST:PORT for upload URLs and /healthz, and for the API too unless --api-listen "
        f"is given (default {DEFAULT_LISTEN})",
    )
    serve.add_argument(
        "--api-listen",
        type=host_port,
        metavar="HOST:PORT",
        help="a listener of its own for the API, /metrics and the web page",
    )
    serve.add_argument(
        "--api-token-file",
        type=existing_file,
        metavar="FILE",
        help="YAML tokens of the API's users (tokens: [{user, token, role, namespaces}]); "
        "re-read on SIGHUP",
    )
    serve.add_argument(
        "--import-allow",
        type=cidr,
        action="append",
        default=[],
        metavar="CIDR",
        help="an address range imports may reach beyond the default (repeatable)",
    )
    serve.add_argument(
        "--header-timeout",
        type=parse_duration,
        default=ServerConfig.header_timeout,
        metavar="DURATION",
        help="close a connection that has not sent a whole request head within this (default 30s)",
    )
    serve.add_argument(
        "--max-images-per-namespace",
        type=positive_int,
        default=ServerConfig.max_images_per_namespace,
        metavar="N",
        help=f"the most images one namespace may hold "
        f"(default {ServerConfig.max_images_per_namespace})",
    )
    serve.add_argument(
        "--max-images",
        type=positive_int,
        default=ServerConfig.max_images,
        metavar="N",
        help=f"the most images the server holds (default {ServerConfig.max_images})",
    )
    serve.add_argument(
        "--lane-threads",
        type=positive_int,
        default=ServerConfig.lane_threads,
        metavar="N",
        help=f"threads that hash and write for all transfers (default {ServerConfig.lane_threads})",
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path("./dvcr-data"),
        help="state, claims and the embedded DVCR (default ./dvcr-data)",
    )
    serve.add_argument("--dvcr", help="registry URL for DVCR (default: OCI layout in data dir)")
    serve.add_argument(
        "--dvcr-auth-config", type=existing_file, help="dockerconfigjson for the DVCR"
    )
    serve.add_argument(
        "--dvcr-ca-bundle", type=existing_file, help="PEM CA bundle for the DVCR's TLS"
    )
    serve.add_argument(
        "--dvcr-insecure", action="store_true", help="do not verify the DVCR's TLS certificate"
    )
    serve.add_argument("--external-url", help="base of the external upload URLs")
    serve.add_argument("--in-cluster-url", help="base of the in-cluster upload URLs")
    serve.add_argument(
        "--metrics-listen",
        type=host_port,
        metavar="HOST:PORT",
        help="a listener of its own for /metrics",
    )
    serve.add_argument("--tls-cert", type=existing_file, help="PEM certificate for HTTPS")
    serve.add_argument("--tls-key", type=existing_file, help="PEM key for HTTPS")
    serve.add_argument(
        "--max-image-size",
        type=parse_size,
        default=ServerConfig.max_image_size,
        help="largest image accepted, received or virtual (default 1Ti)",
    )
    serve.add_argument(
        "--md5", action="store_true", help="compute md5 of every image, not only when asked"
    )
    serve.add_argument(
        "--upload-grace",
        type=parse_duration,
        default=ServerConfig.upload_grace,
        help="how long an upload that broke off waits to be continued (default 15m)",
    )
    serve.add_argument(
        "--upload-idle-timeout",
        type=parse_duration,
        default=ServerConfig.upload_idle_timeout,
        help="cut a request that sends nothing for this long; it stays resumable (default 2m)",
    )
    serve.add_argument(
        "--wait-for-upload-timeout",
        type=parse_duration,
        default=ServerConfig.wait_for_upload_timeout,
        help="fail an image that waits this long for its upload; 0: never (default 24h)",
    )
    serve.add_argument(
        "--checkpoint-every",
        type=parse_size,
        default=ServerConfig.checkpoint_every,
        help="PVC uploads save where they stand this often, to continue after a restart "
        "(default 256Mi; 0: never)",
    )
    serve.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="how much the server logs (default INFO)",
    )


UPLOAD_USAGE = """dvcr-uploader upload FILE --create NAME [--storage STORAGE] [--cluster] \
[-n NAMESPACE] [--no-wait]
       dvcr-uploader upload FILE URL|vi/NAME [-q] [--retries N] [--retry-wait SECONDS]"""

UPLOAD_DESCRIPTION = """\
Upload FILE into an image in one command: `upload FILE --create NAME` creates the \
VirtualImage NAME (a ClusterVirtualImage with --cluster) when it is missing, or uses the \
one of that name that waits for an upload, sends FILE with resume, compares its sha256 \
with the image's, waits until the image is Ready and prints it as `get` does. \
`upload FILE vi/NAME` or `upload FILE URL` sends FILE to an image that exists."""


def _selector_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-l",
        "--selector",
        help="label selector: key=value, key!=value, key, !key, key in (a,b); "
        "comma-separated, all must hold",
    )


def _client_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    apply = commands.add_parser("apply", help="create or update images", parents=[common])
    apply.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")

    create = commands.add_parser("create", help="create images", parents=[common])
    create.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")

    get = commands.add_parser("get", help="list images or show some", parents=[common])
    get.add_argument("resource", help="vi | cvi | vi,cvi | vi/NAME")
    get.add_argument("names", nargs="*", help="images (default: all in the namespace)")
    get.add_argument("-w", "--watch", action="store_true", help="stream rows as they change")
    get.add_argument(
        "-o",
        "--output",
        help="wide | json | yaml | name | jsonpath=TEMPLATE | custom-columns=HEADER:PATH,...",
    )
    get.add_argument(
        "-A", "--all-namespaces", action="store_true", help="the images of every namespace"
    )
    _selector_flag(get)
    get.add_argument("--show-labels", action="store_true", help="a LABELS column, last")

    describe = commands.add_parser("describe", help="show images in detail", parents=[common])
    describe.add_argument("resource", help="vi | cvi | vi/NAME")
    describe.add_argument("names", nargs="*", help="the images (default: all in the namespace)")

    delete = commands.add_parser("delete", help="delete images", parents=[common])
    delete.add_argument("resource", nargs="?", help="vi | cvi | vi/NAME")
    delete.add_argument("names", nargs="*", help="the images")
    delete.add_argument(
        "-f", "--filename", help="delete the images of these manifests (- for stdin)"
    )
    delete.add_argument(
        "--all", action="store_true", help="every image of the kind in the namespace"
    )
    _selector_flag(delete)
    delete.add_argument(
        "--ignore-not-found", action="store_true", help="an image that is not there is no error"
    )
    delete.add_argument(
        "--wait",
        type=parse_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="wait until the images are gone (default true; an image that imports read "
        "is gone once they end)",
    )
    delete.add_argument(
        "--timeout",
        type=parse_duration,
        default=0.0,
        metavar="DURATION",
        help="how long --wait waits (default 0: until they are gone)",
    )

    wait = commands.add_parser(
        "wait",
        help="wait until images get to a state",
        parents=[common],
        epilog="exit codes: 0 every image got there; 1 the timeout passed first, or an image "
        "is not there",
    )
    wait.add_argument(
        "resources", nargs="+", metavar="vi/NAME", help="the images (vi with -l or --all)"
    )
    wait.add_argument("--all", action="store_true", help="every image of the kind")
    _selector_flag(wait)
    wait.add_argument(
        "--for",
        dest="condition",
        metavar="CONDITION",
        help="delete | condition=Ready | jsonpath='{.status.phase}'=Ready",
    )
    wait.add_argument(
        "--timeout",
        type=parse_duration,
        default=30.0,
        metavar="DURATION",
        help="how long to wait for all of them (default 30s)",
    )

    upload = commands.add_parser(
        "upload",
        help="upload a file to an image (--create NAME: a new one) and check its sha256",
        usage=UPLOAD_USAGE,
        description=UPLOAD_DESCRIPTION,
        parents=[common],
        epilog="exit codes: 0 the image holds the file (uploaded now or before); 1 refused, "
        "failed, or the image holds another file; 3 the connection failed (run it again to "
        "continue)",
    )
    upload.add_argument("file", help="image file, or - for stdin")
    upload.add_argument(
        "url",
        nargs="?",
        metavar="URL|vi/NAME",
        help="the image's upload URL, or the image by name (not with --create)",
    )
    upload.add_argument(
        "--create",
        metavar="NAME",
        type=_image_name,
        help="the image to upload to, created when it is missing",
    )
    upload.add_argument(
        "--storage",
        choices=STORAGES,
        help=f"where --create puts the image (default {DEFAULT_STORAGE})",
    )
    upload.add_argument(
        "--cluster", action="store_true", help="--create makes a ClusterVirtualImage"
    )
    upload.add_argument(
        "--no-wait",
        action="store_true",
        help="with --create: do not wait for the image to be Ready once the file is sent",
    )
    upload.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    upload.add_argument(
        "-k",
        "--insecure",
        dest="insecure_skip_tls_verify",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the same as --insecure-skip-tls-verify",
    )
    upload.add_argument(
        "--retries",
        type=int,
        default=10,
        metavar="N",
        help="tries after a failure before giving up; they start over whenever the server "
        "took more bytes (default 10)",
    )
    upload.add_argument(
        "--retry-wait",
        type=parse_duration,
        default=1.0,
        metavar="SECONDS",
        help="the first pause before trying again, doubled each time up to 30s (default 1)",
    )


def _image_name(text: str) -> str:
    if not text or "/" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not an image name")
    return text


def _check_upload_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The combinations of upload's flags that mean nothing, as usage errors."""
    if args.create is not None and args.url is not None:
        parser.error(f"upload: give --create NAME or {args.url}, not both")
    if args.create is None and args.url is None:
        parser.error("upload: give the image: --create NAME, vi/NAME or its upload URL")
    if args.create is None and (args.storage is not None or args.cluster):
        parser.error("upload: --storage and --cluster go with --create NAME")


# -- commands ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from uploader.server.app import StartError, run_server

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        listen=args.listen,
        api_listen=args.api_listen,
        api_token_file=args.api_token_file,
        import_allow=tuple(args.import_allow),
        header_timeout=args.header_timeout,
        max_images_per_namespace=args.max_images_per_namespace,
        max_images=args.max_images,
        lane_threads=args.lane_threads,
        data_dir=args.data_dir,
        dvcr=args.dvcr,
        dvcr_auth_config=args.dvcr_auth_config,
        dvcr_ca_bundle=args.dvcr_ca_bundle,
        dvcr_insecure=args.dvcr_insecure,
        external_url=args.external_url,
        in_cluster_url=args.in_cluster_url,
        metrics_listen=args.metrics_listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_image_size=args.max_image_size,
        checksums=("sha256", "md5") if args.md5 else ("sha256",),
        upload_grace=args.upload_grace,
        upload_idle_timeout=args.upload_idle_timeout,
        wait_for_upload_timeout=args.wait_for_upload_timeout,
        checkpoint_every=args.checkpoint_every,
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(run_server(config))
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _credentials(args: argparse.Namespace) -> Credentials:
    return resolve_credentials(
        args.token, args.certificate_authority, args.insecure_skip_tls_verify
    )


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(args.server, _credentials(args))


def cmd_apply(args: argparse.Namespace) -> int:
    return apply_command.run(args, _client(args), create_only=False)


def cmd_create(args: argparse.Namespace) -> int:
    return apply_command.run(args, _client(args), create_only=True)


def cmd_get(args: argparse.Namespace) -> int:
    return get_command.run(args, _client(args))


def cmd_describe(args: argparse.Namespace) -> int:
    client = _client(args)
    failed = False
    shown = 0
    for target in parse_targets([args.resource, *args.names]):
        try:
            if target.name is not None:
                images = [client.get(target.kind, args.namespace, target.name)]
            else:
                images = client.list(target.kind, args.namespace)["items"]
            for image in images:
                name = image["metadata"]["name"]
                events = client.events(target.kind, args.namespace, name)["items"]
                print(("\n\n" if shown else "") + printers.describe(image, events))
                shown += 1
        except ClientError as exc:
            if not exc.per_object:
                raise
            _print_error(exc)
            failed = True
    return 1 if failed else 0


def cmd_delete(args: argparse.Namespace) -> int:
    return delete_command.run(args, _client(args))


def cmd_wait(args: argparse.Namespace) -> int:
    return wait_command.run(args, _client(args))


def cmd_upload(args: argparse.Namespace) -> int:
    from uploader.client import upload_command

    return upload_command.run(args, _credentials(args))


COMMANDS = {
    "serve": cmd_serve,
    "apply": cmd_apply,
    "create": cmd_create,
    "wait": cmd_wait,
    "get": cmd_get,
    "describe": cmd_describe,
    "delete": cmd_delete,
    "upload": cmd_upload,
}


def _print_error(exc: ClientError) -> None:
    print(exc.shown(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if is_pod_invocation(arguments, os.environ, COMMANDS):
        from uploader.pod.run import main as run_pod

        return run_pod(arguments)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        args.namespace_given = args.namespace is not None
        args.namespace = args.namespace or "default"
    if args.command == "upload":
        _check_upload_args(parser, args)
    try:
        return COMMANDS[args.command](args)
    except ClientError as exc:
        _print_error(exc)
        return 1
    except (CredentialsError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
