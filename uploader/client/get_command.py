"""`dvcr-uploader get`: images by name, by kind, across namespaces, by label; printed as a
table, JSON, YAML, names, JSONPath or custom columns; `-w` streams the changes."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

from uploader.client import printers
from uploader.client.api_client import ApiClient, ClientError
from uploader.client.targets import Target, parse_targets
from uploader.resources import Kind

Object = dict[str, Any]
SIMPLE_OUTPUTS = ("wide", "json", "yaml", "name")


@dataclass
class Output:
    """What `-o` asks for, checked before the server is asked anything."""

    format: str | None  # None (the table), wide, json, yaml, name, jsonpath, custom-columns
    template: str = ""
    columns: list[tuple[str, list[str | int]]] = field(default_factory=list)

    @property
    def table(self) -> bool:
        return self.format in (None, "wide")


def parse_output(text: str | None) -> Output:
    if text is None or text in SIMPLE_OUTPUTS:
        return Output(text)
    if text.startswith("jsonpath="):
        return Output("jsonpath", text.removeprefix("jsonpath="))
    if text.startswith("custom-columns="):
        try:
            columns = printers.custom_columns(text.removeprefix("custom-columns="))
        except printers.CustomColumnsError as exc:
            raise ClientError(str(exc)) from None
        return Output("custom-columns", columns=columns)
    raise ClientError(
        f'unable to match a printer suitable for the output format "{text}", allowed formats '
        "are: custom-columns,json,jsonpath,name,wide,yaml"
    )


@dataclass
class Listing:
    """How rows are laid out: the columns around the image's own."""

    namespaces: bool  # a NAMESPACE column first (-A)
    labels: bool  # a LABELS column last (--show-labels)
    prefix_kind: bool  # names as kind.group/name (more than one kind)

    def header(self, wide: bool) -> list[str]:
        header = list(printers.WIDE_COLUMNS if wide else printers.COLUMNS)
        return self._around(header, "NAMESPACE", "LABELS")

    def row(self, obj: Object, kind: Kind, wide: bool) -> list[str]:
        cells = printers.row(obj, wide)
        if self.prefix_kind:
            cells[0] = f"{kind.display}/{cells[0]}"
        return self._around(cells, obj["metadata"].get("namespace", ""), printers.labels_cell(obj))

    def _around(self, cells: list[str], namespace: str, labels: str) -> list[str]:
        return [
            *([namespace] if self.namespaces else []),
            *cells,
            *([labels] if self.labels else []),
        ]


def run(args: Any, client: ApiClient) -> int:
    targets = parse_targets([args.resource, *args.names])
    output = parse_output(args.output)
    named = [t for t in targets if t.name is not None]
    if args.selector and named:
        raise ClientError("name cannot be provided when a selector is specified")
    if args.all_namespaces and named:
        raise ClientError("a resource cannot be retrieved by name across all namespaces")
    if args.watch:
        if len(targets) > 1:
            raise ClientError(
                "watch is only supported on individual resources and resource collections, "
                f"but {len(targets)} resources were found"
            )
        return _watch(client, targets[0], output, args)
    found: list[tuple[Kind, Object]] = []
    failed = False
    for target in targets:
        try:
            found.extend((target.kind, obj) for obj in _fetch(client, target, args))
        except ClientError as exc:
            if not exc.per_object:
                raise
            print(exc.shown(), file=sys.stderr)
            failed = True
    if failed and not found:
        return 1  # said above
    if not found:
        namespaced = any(t.kind.namespaced for t in targets) and not args.all_namespaces
        where = f" in {args.namespace} namespace" if namespaced else ""
        print(f"No resources found{where}.", file=sys.stderr)
        return 0
    single = len(targets) == 1 and len(named) == 1
    listing = Listing(
        namespaces=args.all_namespaces,
        labels=args.show_labels,
        prefix_kind=len({t.kind for t in targets}) > 1,
    )
    _print(found, output, listing, single)
    return 1 if failed else 0


def _fetch(client: ApiClient, target: Target, args: Any) -> list[Object]:
    if target.name is not None:
        return [client.get(target.kind, args.namespace, target.name)]
    namespace = None if args.all_namespaces else args.namespace
    items: list[Object] = client.list(target.kind, namespace, args.selector)["items"]
    return items


def _print(
    found: list[tuple[Kind, Object]], output: Output, listing: Listing, single: bool
) -> None:
    objects = [obj for _, obj in found]
    data: Any = objects[0] if single else {"apiVersion": "v1", "kind": "List", "items": objects}
    if output.format == "json":
        print(printers.to_json(data))
    elif output.format == "yaml":
        print(printers.to_yaml(data), end="")
    elif output.format == "jsonpath":
        # As kubectl: no newline of its own; templates add {"\n"} where they want one.
        sys.stdout.write(printers.jsonpath(output.template, data))
    elif output.format == "name":
        for kind, obj in found:
            print(f"{kind.display}/{obj['metadata']['name']}")
    elif output.format == "custom-columns":
        header = [name for name, _ in output.columns]
        rows = [printers.custom_row(obj, output.columns) for obj in objects]
        print(printers.table(rows, header))
    else:
        wide = output.format == "wide"
        tables = []
        for kind in dict.fromkeys(kind for kind, _ in found):
            # A cluster-scoped kind has no NAMESPACE column, -A or not.
            layout = replace(listing, namespaces=listing.namespaces and kind.namespaced)
            rows = [layout.row(obj, k, wide) for k, obj in found if k is kind]
            tables.append(printers.table(rows, layout.header(wide)))
        print("\n\n".join(tables))


def _watch(client: ApiClient, target: Target, output: Output, args: Any) -> int:
    kind, name = target.kind, target.name
    if name:
        client.get(kind, args.namespace, name)  # NotFound before watching, as kubectl
    namespace = None if args.all_namespaces else args.namespace
    wide = output.format == "wide"
    listing = Listing(
        namespaces=args.all_namespaces and kind.namespaced,
        labels=args.show_labels,
        prefix_kind=False,
    )
    header = listing.header(wide)
    widths: list[int] | None = None
    first = 1 if listing.namespaces else 0  # where the image's own columns begin
    age = first + 4
    shown: dict[tuple[str, str], list[str]] = {}
    try:
        for event in client.watch(kind, namespace, name, args.selector):
            obj = event["object"]
            if not output.table:
                _print([(kind, obj)], output, listing, single=True)
                sys.stdout.flush()
                continue
            cells = listing.row(obj, kind, wide)
            key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            without_age = cells[:age] + cells[age + 1 :]
            if shown.get(key) == without_age and event["type"] != "DELETED":
                continue  # only the age moved on
            shown[key] = without_age
            if widths is None:
                # Rows come one at a time, so columns get room for their longest values.
                widths = [len(h) + 3 for h in header]
                if listing.namespaces:
                    widths[0] = max(len(cells[0]), len("NAMESPACE")) + 3
                widths[first : first + 4] = [
                    max(len(cells[first]), 4) + 3,
                    len("WaitForUserUpload") + 3,
                    8,
                    11,
                ]
                print(_line(header, widths))
            print(_line(cells, widths))
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0


def _line(cells: list[str], widths: list[int]) -> str:
    return "".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
