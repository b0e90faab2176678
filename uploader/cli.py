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
    parse_duration,
    parse_size,
    positive_int,
)
from uploader.client import printers
from uploader.client.api_client import ApiClient, ClientError
from uploader.client.applyinput import ManifestError, load_documents
from uploader.client.credentials import Credentials, CredentialsError, resolve_credentials
from uploader.resources import KINDS, Kind, kind_for_word
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
        default=default("default"),
        help="namespace (default: default)",
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


def _client_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    apply = commands.add_parser("apply", help="create or update images", parents=[common])
    apply.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")

    get = commands.add_parser("get", help="list images or show one", parents=[common])
    get.add_argument("resource", help="vi | cvi")
    get.add_argument("name", nargs="?", help="one image (default: all in the namespace)")
    get.add_argument("-w", "--watch", action="store_true", help="stream rows as they change")
    get.add_argument("-o", "--output", help="wide | json | yaml | name | jsonpath=TEMPLATE")

    describe = commands.add_parser("describe", help="show an image in detail", parents=[common])
    describe.add_argument("resource", help="vi | cvi")
    describe.add_argument("name", help="the image")

    delete = commands.add_parser("delete", help="delete an image", parents=[common])
    delete.add_argument("resource", help="vi | cvi")
    delete.add_argument("name", help="the image")

    upload = commands.add_parser(
        "upload",
        help="upload a file to an image and check the image's sha256 against it",
        parents=[common],
        epilog="exit codes: 0 the image holds the file (uploaded now or before); 1 refused, "
        "failed, or the image holds another file; 3 the connection failed (run it again to "
        "continue)",
    )
    upload.add_argument("file", help="image file, or - for stdin")
    upload.add_argument(
        "url", metavar="URL|vi/NAME", help="the image's upload URL, or the image by name"
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


def _kind(word: str) -> Kind:
    kind = kind_for_word(word)
    if kind is None:
        raise ClientError(f'the server doesn\'t have a resource type "{word}"', reason="BadRequest")
    return kind


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
    docs = load_documents(args.filename)
    client = _client(args)
    failed = False
    for doc in docs:
        kind_name = doc.get("kind")
        kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
        if kind is None:
            print(
                f'error: no matches for kind "{kind_name}" in version '
                f'"{doc.get("apiVersion")}"; this server has {", ".join(KINDS)}',
                file=sys.stderr,
            )
            failed = True
            continue
        raw_metadata = doc.get("metadata")
        metadata: dict[str, Any] = raw_metadata if isinstance(raw_metadata, dict) else {}
        name = metadata.get("name")
        namespace = metadata.get("namespace") or args.namespace
        if not isinstance(namespace, str):
            print(f"error: metadata.namespace of {name} is not a string", file=sys.stderr)
            failed = True
            continue
        try:
            if not isinstance(name, str) or not name:
                created = client.create(kind, namespace, doc)  # the server says what is wrong
                print(f"{kind.display}/{created['metadata']['name']} created")
                continue
            try:
                current = client.get(kind, namespace, name)
            except ClientError as exc:
                if exc.code != 404:
                    raise
                client.create(kind, namespace, doc)
                action = "created"
            else:
                same = current.get("spec") == _with_defaults(doc.get("spec"))
                if same and all(
                    current["metadata"].get(k) == metadata.get(k)
                    for k in ("labels", "annotations")
                    if k in metadata
                ):
                    action = "unchanged"
                else:
                    client.replace(kind, namespace, name, doc)
                    action = "configured"
        except ClientError as exc:
            _print_error(exc)
            failed = True
            continue
        print(f"{kind.display}/{name} {action}")
    return 1 if failed else 0


def _with_defaults(spec: Any) -> Any:
    if isinstance(spec, dict) and "storage" not in spec:
        return {**spec, "storage": "ContainerRegistry"}
    return spec


def _print_objects(objects: list[dict[str, Any]], output: str | None, listing: bool) -> None:
    if output in ("json", "yaml"):
        data: Any = (
            objects[0]
            if not listing
            else {
                "apiVersion": "v1",
                "kind": "List",
                "items": objects,
            }
        )
        print(printers.to_json(data) if output == "json" else printers.to_yaml(data), end="")
        if output == "json":
            print()
    elif output and output.startswith("jsonpath="):
        data = objects[0] if not listing else {"kind": "List", "items": objects}
        # As kubectl: no newline of its own; templates add {"\n"} where they want one.
        sys.stdout.write(printers.jsonpath(output.removeprefix("jsonpath="), data))
    elif output == "name":
        for obj in objects:
            print(
                f"{obj['kind'].lower()}.{obj['apiVersion'].split('/')[0]}/{obj['metadata']['name']}"
            )
    else:
        wide = output == "wide"
        header = printers.WIDE_COLUMNS if wide else printers.COLUMNS
        print(printers.table([printers.row(o, wide) for o in objects], header))


def cmd_get(args: argparse.Namespace) -> int:
    kind = _kind(args.resource)
    client = _client(args)
    if (
        args.output
        and args.output not in ("wide", "json", "yaml", "name")
        and not (args.output.startswith("jsonpath="))
    ):
        raise ClientError(
            f'unable to match a printer suitable for the output format "{args.output}"'
        )
    if args.watch:
        return _watch(client, kind, args)
    if args.name:
        objects = [client.get(kind, args.namespace, args.name)]
    else:
        objects = client.list(kind, args.namespace)["items"]
        if not objects:
            where = f" in {args.namespace} namespace" if kind.namespaced else ""
            print(f"No resources found{where}.", file=sys.stderr)
            return 0
    _print_objects(objects, args.output, listing=not args.name)
    return 0


def _watch(client: ApiClient, kind: Kind, args: argparse.Namespace) -> int:
    if args.name:
        client.get(kind, args.namespace, args.name)  # NotFound before watching, as kubectl
    wide = args.output == "wide"
    table_output = args.output in (None, "wide")
    header = printers.WIDE_COLUMNS if wide else printers.COLUMNS
    widths: list[int] | None = None
    shown: dict[str, list[str]] = {}
    try:
        for event in client.watch(kind, args.namespace, args.name):
            obj = event["object"]
            if not table_output:
                _print_objects([obj], args.output, listing=False)
                sys.stdout.flush()
                continue
            cells = printers.row(obj, wide)
            name = obj["metadata"]["name"]
            if shown.get(name, [])[:4] == cells[:4] and event["type"] != "DELETED":
                continue
            shown[name] = cells
            if widths is None:
                # Rows come one at a time, so columns get room for their longest values.
                widths = [len(h) + 3 for h in header]
                widths[:4] = [max(len(name), 4) + 3, len("WaitForUserUpload") + 3, 8, 11]
                print("".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
            print("".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    kind = _kind(args.resource)
    print(printers.describe(_client(args).get(kind, args.namespace, args.name)))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    kind = _kind(args.resource)
    _client(args).delete(kind, args.namespace, args.name)
    print(f'{kind.display} "{args.name}" deleted')
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from uploader.client import upload_command

    return upload_command.run(args, _credentials(args))


COMMANDS = {
    "serve": cmd_serve,
    "apply": cmd_apply,
    "get": cmd_get,
    "describe": cmd_describe,
    "delete": cmd_delete,
    "upload": cmd_upload,
}


def _print_error(exc: ClientError) -> None:
    if exc.code and exc.code != 401:  # kubectl says a 401 as an error of its own
        print(f"Error from server ({exc.reason or exc.code}): {exc.message}", file=sys.stderr)
    else:
        print(f"error: {exc.message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
