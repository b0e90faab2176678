"""`dvcr-uploader wait`: until images get to a state, as `kubectl wait` does.

`--for=jsonpath='{.status.phase}'=Ready` (a JSONPath and the value it must show; without
`=VALUE`, until it shows anything), `--for=condition=Ready[=true]` and `--for=delete`;
`--timeout` (default 30s) bounds the whole wait. `-l SELECTOR` or `--all` waits for the
images of a kind that are there when the wait begins. Each image that gets there is printed as
`KIND/NAME condition met`; a timeout is `error: timed out waiting for the condition on
virtualimages/NAME` and exit code 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from uploader.client import printers
from uploader.client.api_client import ApiClient, ClientError
from uploader.client.targets import Target, parse_targets

Object = dict[str, Any]
Check = Callable[[Object], bool]
POLL = 0.2


def parse_condition(text: str) -> tuple[str, Check | None]:
    """(`--for` as given, a check of the object; None for `delete`)."""
    if text == "delete":
        return text, None
    if text.startswith("condition="):
        name, _, wanted = text.removeprefix("condition=").partition("=")
        if not name:
            raise ClientError(f"condition name is empty in --for={text}")
        expected = (wanted or "true").lower()
        return text, lambda obj: any(
            c.get("type") == name and str(c.get("status", "")).lower() == expected
            for c in (obj.get("status") or {}).get("conditions") or []
        )
    if text.startswith("jsonpath="):
        path, value = _split_jsonpath(text.removeprefix("jsonpath="))
        try:
            printers.jsonpath(path, {})
        except printers.JsonPathError as exc:
            raise ClientError(f"unrecognized JSONPath in --for={text}: {exc}") from None
        if value is None:
            return text, lambda obj: printers.jsonpath(path, obj) != ""
        return text, lambda obj: printers.jsonpath(path, obj) == value
    raise ClientError(
        f"unrecognized condition: {text!r}; use --for=delete, --for=condition=NAME[=VALUE] "
        "or --for=jsonpath='{JSONPATH}'=VALUE"
    )


def _split_jsonpath(text: str) -> tuple[str, str | None]:
    """`{.status.phase}=Ready` or `.status.phase=Ready` as (template, value)."""
    if text.startswith("{"):
        end = text.find("}")
        if end < 0:
            raise ClientError(f"unclosed '{{' in --for=jsonpath={text}")
        path, rest = text[: end + 1], text[end + 1 :]
    else:
        path, sep, value = text.partition("=")
        rest = sep + value
    if not path.strip("{}. "):
        raise ClientError("jsonpath expression cannot be empty")
    if rest == "":
        return path, None
    if not rest.startswith("="):
        raise ClientError(
            f"jsonpath wait format must be --for=jsonpath='{{.status.phase}}'=Ready: {text}"
        )
    return path, rest[1:]


def run(args: Any, client: ApiClient) -> int:
    if args.condition is None:
        raise ClientError("--for must be set to one of: delete, condition=NAME, jsonpath=...")
    _, check = parse_condition(args.condition)
    targets = _targets(args, client)
    deadline = time.monotonic() + max(args.timeout, 0.0)
    for target in targets:
        if not _wait_one(client, target, args.namespace, check, deadline):
            print(
                f"error: timed out waiting for the condition on {target.kind.plural}/{target.name}",
                file=sys.stderr,
            )
            return 1
        print(f"{target.kind.display}/{target.name} condition met")
    return 0


def _targets(args: Any, client: ApiClient) -> list[Target]:
    """The images named, or (with `-l` or `--all`) those listed when the wait begins."""
    targets = parse_targets(args.resources)
    selecting = args.all or args.selector is not None
    if selecting:
        if any(t.name is not None for t in targets):
            raise ClientError("name cannot be provided when a selector or --all is specified")
        listed = [
            Target(t.kind, str(obj["metadata"]["name"]))
            for t in targets
            for obj in client.list(t.kind, args.namespace, args.selector)["items"]
        ]
        if not listed:
            raise ClientError("no matching resources found")
        return listed
    if any(t.name is None for t in targets):
        raise ClientError(
            "resource name may not be empty: give vi/NAME, vi NAME, -l SELECTOR or --all"
        )
    return targets


def _wait_one(
    client: ApiClient, target: Target, namespace: str, check: Check | None, deadline: float
) -> bool:
    """True once the image gets there; False when the deadline passes first. NotFound,
    unless waiting for deletion, is ClientError at once."""
    assert target.name is not None
    path = client.path(target.kind, namespace, target.name)
    while True:
        code, obj = client.call("GET", path)
        if code == 404 and check is None:
            return True
        if code != 200 or not isinstance(obj, dict):
            message = obj.get("message") if isinstance(obj, dict) else None
            reason = obj.get("reason") if isinstance(obj, dict) else None
            raise ClientError(message or f"the server answered {code}", code, reason or "")
        if check is not None and check(obj):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))
