"""`dvcr-uploader`: the server (`serve`) and a kubectl-like client for its images."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from uploader import printers
from uploader.client import ApiClient, ClientError
from uploader.config import DEFAULT_LISTEN, ServerConfig
from uploader.resources import KINDS, Kind, kind_for_word

DEFAULT_SERVER = "http://127.0.0.1:8444"
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`1073741824`, `512Mi`, `10Gi`, `1T`."""
    value = text.strip().removesuffix("i").removesuffix("B")
    suffix = value[-1:].upper() if value[-1:].isalpha() else ""
    number = value[: len(value) - len(suffix)]
    if suffix not in _SIZE_SUFFIXES or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512Mi or 2Ti")
    return int(number) * _SIZE_SUFFIXES[suffix]


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `24h`, `7d`; `0` means never."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _DURATION_UNITS else "s"
    number = value.removesuffix(unit) if value[-1:] in _DURATION_UNITS else value
    try:
        return float(number) * _DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration like 90s, 15m or 24h"
        ) from None


def _client_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--server",
        default=default if suppress else os.environ.get("DVCR_SERVER", DEFAULT_SERVER),
        help=f"server URL (default {DEFAULT_SERVER}, env DVCR_SERVER)",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default=default if suppress else "default",
        help="namespace (default: default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvcr-uploader",
        description="Virtual machine images into DVCR or volumes: the server and its client.",
    )
    _client_flags(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _client_flags(common, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server", parents=[common])
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT to listen on")
    serve.add_argument("--data-dir", type=Path, default=Path("./dvcr-data"))
    serve.add_argument("--dvcr", help="registry URL for DVCR (default: OCI layout in data dir)")
    serve.add_argument("--dvcr-auth-config", type=Path, help="dockerconfigjson for the DVCR")
    serve.add_argument("--dvcr-ca-bundle", type=Path, help="PEM CA bundle for the DVCR's TLS")
    serve.add_argument(
        "--dvcr-insecure", action="store_true", help="do not verify the DVCR's TLS certificate"
    )
    serve.add_argument("--external-url", help="base of the external upload URLs")
    serve.add_argument("--in-cluster-url", help="base of the in-cluster upload URLs")
    serve.add_argument("--metrics-listen", help="HOST:PORT for a separate /metrics listener")
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate for HTTPS")
    serve.add_argument("--tls-key", type=Path, help="PEM key for HTTPS")
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
    serve.add_argument("--log-level", default="INFO")

    apply = commands.add_parser("apply", help="create or update images", parents=[common])
    apply.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")

    get = commands.add_parser("get", help="list images or show one", parents=[common])
    get.add_argument("resource", help="vi | cvi")
    get.add_argument("name", nargs="?")
    get.add_argument("-w", "--watch", action="store_true", help="stream rows as they change")
    get.add_argument("-o", "--output", help="wide | json | yaml | name | jsonpath=TEMPLATE")

    describe = commands.add_parser("describe", help="show an image in detail", parents=[common])
    describe.add_argument("resource")
    describe.add_argument("name")

    delete = commands.add_parser("delete", help="delete an image", parents=[common])
    delete.add_argument("resource")
    delete.add_argument("name")

    upload = commands.add_parser("upload", help="upload a file to an upload URL", parents=[common])
    upload.add_argument("file", help="image file, or - for stdin")
    upload.add_argument("url", help="the image's upload URL")
    upload.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    upload.add_argument("-k", "--insecure", action="store_true", help="do not verify TLS")
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
    return parser


def _kind(word: str) -> Kind:
    kind = kind_for_word(word)
    if kind is None:
        raise ClientError(f'the server doesn\'t have a resource type "{word}"', reason="BadRequest")
    return kind


# -- commands ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from uploader.app import run_server

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        listen=args.listen,
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
    asyncio.run(run_server(config))
    return 0


def _load_documents(filename: str) -> list[dict[str, Any]]:
    text = sys.stdin.read() if filename == "-" else Path(filename).read_text()
    docs: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ClientError(f"{filename}: a document is not a mapping")
        if doc.get("kind") == "List":
            docs.extend(doc.get("items") or [])
        else:
            docs.append(doc)
    return docs


def cmd_apply(args: argparse.Namespace) -> int:
    client = ApiClient(args.server)
    failed = False
    for doc in _load_documents(args.filename):
        kind = KINDS.get(doc.get("kind", ""))
        if kind is None:
            print(f'error: unknown kind "{doc.get("kind")}"', file=sys.stderr)
            failed = True
            continue
        metadata = doc.get("metadata") or {}
        name = metadata.get("name", "")
        namespace = metadata.get("namespace") or args.namespace
        try:
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
    client = ApiClient(args.server)
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
    print(printers.describe(ApiClient(args.server).get(kind, args.namespace, args.name)))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    kind = _kind(args.resource)
    ApiClient(args.server).delete(kind, args.namespace, args.name)
    print(f'{kind.display} "{args.name}" deleted')
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from uploader.upload_client import UploadFailed, upload

    try:
        answer = asyncio.run(
            upload(
                args.file,
                args.url,
                quiet=args.quiet,
                insecure=args.insecure,
                retries=args.retries,
                retry_wait=args.retry_wait,
            )
        )
    except UploadFailed as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    print(json.dumps(answer))
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "apply": cmd_apply,
    "get": cmd_get,
    "describe": cmd_describe,
    "delete": cmd_delete,
    "upload": cmd_upload,
}


def _print_error(exc: ClientError) -> None:
    if exc.code:
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
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
