"""Output of `get` and `describe`: kubectl's table, ages, labels, custom columns, JSON,
YAML, JSONPath and events."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import yaml

Object = dict[str, Any]

COLUMNS = ("NAME", "PHASE", "CDROM", "PROGRESS", "AGE")
WIDE_COLUMNS = (*COLUMNS, "STORAGE", "FORMAT", "SIZE", "UNPACKED")


def human_duration(seconds: float) -> str:
    """kubectl's HumanDuration: 4s, 119s, 2m3s, 15m, 7h30m, 23h, 3d4h, 400d, 2y10d."""
    s = int(seconds)
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def age(obj: Object, now: datetime | None = None) -> str:
    return since(obj.get("metadata", {}).get("creationTimestamp"), now)


def since(timestamp: str | None, now: datetime | None = None) -> str:
    """How long ago an RFC 3339 time was, as kubectl says it; <unknown> without one."""
    if not timestamp:
        return "<unknown>"
    then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return human_duration(((now or datetime.now(UTC)) - then).total_seconds())


def labels_cell(obj: Object) -> str:
    """The LABELS column of --show-labels: k=v pairs by key, or <none>."""
    labels = obj.get("metadata", {}).get("labels") or {}
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels)) or "<none>"


class CustomColumnsError(ValueError):
    pass


def custom_columns(spec: str) -> list[tuple[str, list[str | int]]]:
    """`NAME:.metadata.name,PHASE:{.status.phase}` as (header, JSONPath steps) pairs."""
    if not spec:
        raise CustomColumnsError("custom-columns format specified but no custom columns given")
    columns: list[tuple[str, list[str | int]]] = []
    for part in spec.split(","):
        header, colon, path = part.partition(":")
        if not colon or not header or not path:
            raise CustomColumnsError(
                f"unexpected custom-columns spec: {part}, expected <header>:<json-path-expr>"
            )
        path = path.strip()
        if path.startswith("{") and path.endswith("}"):
            path = path[1:-1]
        try:
            columns.append((header, _steps(path)))
        except JsonPathError as exc:
            raise CustomColumnsError(f"{part}: {exc}") from None
    return columns


def custom_row(obj: Object, columns: list[tuple[str, list[str | int]]]) -> list[str]:
    """One row: each column's values joined by commas, <none> where there is none."""
    cells = []
    for _, steps in columns:
        values = [v for v in _select([obj], steps) if v is not None]
        cells.append(",".join(_format(v) for v in values) or "<none>")
    return cells


def row(obj: Object, wide: bool = False) -> list[str]:
    status = obj.get("status", {})
    cells = [
        obj["metadata"]["name"],
        status.get("phase", ""),
        "true" if status.get("cdrom") else "false",
        status.get("progress", ""),
        age(obj),
    ]
    if wide:
        size = status.get("size", {})
        cells += [
            obj.get("spec", {}).get("storage", ""),
            status.get("format", ""),
            size.get("stored", ""),
            size.get("unpacked", ""),
        ]
    return cells


def table(rows: Iterable[list[str]], header: Iterable[str]) -> str:
    """Columns padded like kubectl: each as wide as its widest cell, three spaces apart."""
    lines = [list(header), *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        out.append("   ".join(cells).rstrip())
    return "\n".join(out)


def to_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=4)


# -- JSONPath, the subset kubectl users write -------------------------------------------

_STEP = re.compile(r"""\.\.|\.([A-Za-z0-9_\-/]+|\*)|\[(\*|-?\d+|'[^']*'|"[^"]*")\]""")


class JsonPathError(ValueError):
    pass


def _steps(expr: str) -> list[str | int]:
    expr = expr.strip()
    if expr.startswith("$"):
        expr = expr[1:]
    if expr in ("", "."):
        return []
    steps: list[str | int] = []
    pos = 0
    while pos < len(expr):
        match = _STEP.match(expr, pos)
        if match is None:
            raise JsonPathError(f"unrecognized JSONPath at {expr[pos:]!r}")
        if match.group(0) == "..":
            raise JsonPathError("recursive descent (..) is not supported")
        name, index = match.group(1), match.group(2)
        if name is not None:
            steps.append(name)
        elif index == "*":
            steps.append("*")
        elif index[0] in "'\"":
            steps.append(index[1:-1])
        else:
            steps.append(int(index))
        pos = match.end()
    return steps


def _select(values: list[Any], steps: list[str | int]) -> list[Any]:
    for step in steps:
        found: list[Any] = []
        for value in values:
            if step == "*":
                if isinstance(value, dict):
                    found.extend(value.values())
                elif isinstance(value, list):
                    found.extend(value)
            elif isinstance(step, int):
                if isinstance(value, list) and -len(value) <= step < len(value):
                    found.append(value[step])
            elif isinstance(value, dict) and step in value:
                found.append(value[step])
        values = found
    return values


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else str(value)


_TEMPLATE = re.compile(r"\{([^{}]*)\}")


def _parse_template(template: str) -> list[tuple[str, str]]:
    """[(kind, text)] with kind one of literal | path | range | end."""
    parts: list[tuple[str, str]] = []
    pos = 0
    for match in _TEMPLATE.finditer(template):
        if match.start() > pos:
            parts.append(("literal", template[pos : match.start()]))
        inner = match.group(1).strip()
        if inner.startswith("range "):
            parts.append(("range", inner[6:]))
        elif inner == "end":
            parts.append(("end", ""))
        elif len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
            parts.append(("literal", json.loads(f'"{inner[1:-1]}"')))
        else:
            parts.append(("path", inner))
        pos = match.end()
    if pos < len(template):
        parts.append(("literal", template[pos:]))
    return parts


def _render(parts: list[tuple[str, str]], root: Any) -> tuple[str, int]:
    out: list[str] = []
    i = 0
    while i < len(parts):
        kind, text = parts[i]
        if kind == "literal":
            out.append(text)
        elif kind == "path":
            out.append(" ".join(_format(v) for v in _select([root], _steps(text))))
        elif kind == "range":
            body = parts[i + 1 :]
            consumed = 0
            for item in _select([root], _steps(text)):
                rendered, consumed = _render(body, item)
                out.append(rendered)
            if consumed == 0:
                _, consumed = _render(body, None)
            i += consumed + 1
        elif kind == "end":
            return "".join(out), i + 1
        i += 1
    return "".join(out), i


def jsonpath(template: str, data: Any) -> str:
    """Renders a kubectl JSONPath template: `{.status.phase}`, `{.items[*].metadata.name}`,
    `{range .items[*]}{.metadata.name}{"\\n"}{end}`. Maps and lists print as compact JSON."""
    if "{" not in template:
        template = "{" + template + "}"
    rendered, _ = _render(_parse_template(template), data)
    return rendered


def describe(obj: Object, events: list[Object] | None = None) -> str:
    """A human view in kubectl's describe style; `events` (v1 Events) at the end."""
    meta = obj.get("metadata", {})
    status = obj.get("status", {})
    lines = [
        f"Name:         {meta.get('name', '')}",
        *([f"Namespace:    {meta['namespace']}"] if meta.get("namespace") else []),
        f"Labels:       {_pairs(meta.get('labels'))}",
        f"Annotations:  {_pairs(meta.get('annotations'))}",
        f"API Version:  {obj.get('apiVersion', '')}",
        f"Kind:         {obj.get('kind', '')}",
        "Metadata:",
        f"  Creation Timestamp:  {meta.get('creationTimestamp', '')}",
        f"  Generation:          {meta.get('generation', '')}",
        f"  UID:                 {meta.get('uid', '')}",
        "Spec:",
        _indent(_describe_map(obj.get("spec", {})), 2),
        "Status:",
        _indent(_describe_map({k: v for k, v in status.items() if k != "conditions"}), 2),
    ]
    conditions = status.get("conditions", [])
    if conditions:
        lines.append("  Conditions:")
        lines.append(
            _indent(
                table(
                    [
                        [
                            c.get("type", ""),
                            c.get("status", ""),
                            c.get("reason", ""),
                            c.get("lastTransitionTime", ""),
                            c.get("message", ""),
                        ]
                        for c in conditions
                    ],
                    ("Type", "Status", "Reason", "Last Transition Time", "Message"),
                ),
                4,
            )
        )
    lines.append(describe_events(events or []))
    return "\n".join(line for line in lines if line != "")


def describe_events(events: list[Object], now: datetime | None = None) -> str:
    """kubectl describe's Events section: Type, Reason, Age, From, Message, oldest first."""
    if not events:
        return "Events:  <none>"
    rows = []
    for event in sorted(events, key=lambda e: str(e.get("lastTimestamp") or "")):
        last = since(event.get("lastTimestamp"), now)
        count = event.get("count") or 1
        shown = f"{last} (x{count} over {since(event.get('firstTimestamp'), now)})"
        rows.append(
            [
                str(event.get("type", "")),
                str(event.get("reason", "")),
                shown if count > 1 else last,
                str((event.get("source") or {}).get("component", "")),
                str(event.get("message", "")),
            ]
        )
    header = ["Type", "Reason", "Age", "From", "Message"]
    lines = [header, ["----", "------", "----", "----", "-------"], *rows]  # kubectl's rule
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
    return "Events:\n" + text


def _pairs(mapping: dict[str, str] | None) -> str:
    if not mapping:
        return "<none>"
    return "\n              ".join(f"{k}={v}" for k, v in mapping.items())


def _title(key: str) -> str:
    """imageUploadURLs -> Image Upload URLs: a space before an upper-case letter that
    follows a lower-case one."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", key)
    return words[:1].upper() + words[1:]


def _describe_map(mapping: dict[str, Any], depth: int = 1) -> str:
    """Nested sections indented by two; values line up in one column at every depth."""
    lines: list[str] = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            lines.append(f"{_title(key)}:")
            lines.append(_indent(_describe_map(value, depth + 1), 2))
        elif isinstance(value, list):
            lines.append(f"{_title(key)}:")
            for item in value:
                lines.append(f"  - {_format(item)}")
        else:
            pad = " " * max(1, 22 - 2 * depth - len(_title(key)))
            lines.append(f"{_title(key)}:{pad}{_format(value)}")
    return "\n".join(line for line in lines if line)


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())
