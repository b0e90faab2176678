"""`dvcr-uploader upload FILE URL|vi/NAME` and `upload FILE --create NAME`: where the file
goes, sending it, and checking that the image the server made holds the file.

`--create NAME` makes the image first, or reuses one that waits for an upload
(uploader/client/upload_create.py), sends the file to `vi/NAME`, waits until the image is
Ready (not with `--no-wait`) and prints its row as `get` does.

`vi/NAME` (any word of a kind, `cvi/NAME` too) is looked up through the API, with the
token: a Ready image is not sent anything, a Failed one says why, and any other takes the
file at its external upload URL. At the end the file's sha256 is compared with the image's:
the upload URL's last answer holds it; failing that, the API's object does.

Exit codes: 0 the image holds the file (uploaded now, or before: "already uploaded"); 1 the
server refused or failed the image, the image holds something else than the file, or its
checksum could not be learned for an image that was already Ready; 3 the connection failed
(sending again may help).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from uploader.client import printers
from uploader.client.api_client import ApiClient, ClientError
from uploader.client.credentials import Credentials
from uploader.client.filehash import FileHasher, StreamHasher
from uploader.client.resumable_upload import (
    EXIT_OK,
    EXIT_REFUSED,
    UploadFailed,
    UploadResult,
    upload,
)
from uploader.client.upload_create import ensure_image
from uploader.resources import Kind, kind_for_word

URL_WAIT = 30.0  # a new image gets its upload URL within this
URL_POLL = 0.5
READY_POLL = 0.2


@dataclass
class Target:
    label: str  # what messages call the image: vi/NAME, or "the image" for a bare URL
    url: str | None  # None: nothing to send, the image is already Ready
    image: dict[str, Any] | None = None  # the API's object, in the vi/NAME form
    kind: Kind | None = None


def run(args: Any, credentials: Credentials) -> int:
    """The command; prints its result and returns the exit code."""
    try:
        if args.create:
            what = "standard input" if args.file == "-" else args.file
            args.url = ensure_image(_api(args, credentials), args, what)
        target = _resolve(args, credentials)
        if target.url is None:
            result = asyncio.run(_hash_only(args.file, target))
        else:
            result = asyncio.run(
                upload(
                    args.file,
                    target.url,
                    quiet=args.quiet,
                    tls=_tls(target.url, credentials),
                    retries=args.retries,
                    retry_wait=args.retry_wait,
                )
            )
        expected = _expected_sha256(result, target, args, credentials)
        _check(result, expected, target, args)
        if args.create:
            _show_final(args, credentials, target)
            return EXIT_OK
    except UploadFailed as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result.answer))
    return EXIT_OK


def _api(args: Any, credentials: Credentials) -> ApiClient:
    try:
        return ApiClient(args.server, credentials)
    except ClientError as exc:
        raise UploadFailed(exc.message, EXIT_REFUSED) from None


def _show_final(args: Any, credentials: Credentials, target: Target) -> None:
    """Prints the image's row once it is Ready (at once with --no-wait); UploadFailed when
    it Failed instead."""
    assert target.kind is not None
    client = _api(args, credentials)
    while True:
        image = _api_get(client, target.kind, args.namespace, args.create)
        phase = (image.get("status") or {}).get("phase")
        if args.no_wait or phase in ("Ready", "Failed"):
            break
        time.sleep(READY_POLL)
    print(printers.table([printers.row(image)], printers.COLUMNS))
    if phase == "Failed":
        reason, message = _failure(image.get("status") or {})
        raise UploadFailed(f"{target.label} failed ({reason}): {message}", EXIT_REFUSED)


def _tls(url: str, credentials: Credentials) -> Any:
    return credentials.ssl_context() if url.startswith("https://") else None


def _resolve(args: Any, credentials: Credentials) -> Target:
    where = args.url
    if where.startswith(("http://", "https://")):
        return Target("the image", where)
    word, _, name = where.partition("/")
    kind = kind_for_word(word) if name and "/" not in name else None
    if kind is None:
        raise UploadFailed(
            f"{where!r} is neither an upload URL (http:// or https://) nor vi/NAME", EXIT_REFUSED
        )
    label = f"{kind.short}/{name}"
    client = _api(args, credentials)
    deadline = time.monotonic() + URL_WAIT
    while True:
        image = _api_get(client, kind, args.namespace, name)
        status = image.get("status") or {}
        phase = status.get("phase")
        source = (image.get("spec") or {}).get("dataSource") or {}
        if phase == "Ready":
            return Target(label, None, image, kind)
        if phase == "Failed":
            reason, message = _failure(status)
            raise UploadFailed(f"{label} failed ({reason}): {message}", EXIT_REFUSED)
        if source.get("type") != "Upload":
            raise UploadFailed(
                f"{label} takes no upload: its data source is {source.get('type')}", EXIT_REFUSED
            )
        url = (status.get("imageUploadURLs") or {}).get("external")
        if url:
            return Target(label, url, image, kind)
        if time.monotonic() > deadline:
            raise UploadFailed(
                f"{label} has no upload URL after {URL_WAIT:g} s (phase {phase})", EXIT_REFUSED
            )
        time.sleep(URL_POLL)


def _api_get(client: ApiClient, kind: Kind, namespace: str, name: str) -> dict[str, Any]:
    try:
        return client.get(kind, namespace, name)
    except ClientError as exc:
        if exc.code == 401:
            raise UploadFailed(exc.message, EXIT_REFUSED) from None
        prefix = f"Error from server ({exc.reason or exc.code}): " if exc.code else ""
        raise UploadFailed(prefix + exc.message, EXIT_REFUSED) from None


def _failure(status: dict[str, Any]) -> tuple[str, str]:
    """The Ready condition's reason and message."""
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("reason") or "Failed", condition.get("message") or ""
    return "Failed", "the server gives no reason"


async def _hash_only(path: str, target: Target) -> UploadResult:
    """The image is already Ready: the file is only hashed, to compare."""
    assert target.image is not None
    status = target.image.get("status") or {}
    answer = {
        "phase": "Ready",
        "progress": status.get("progress"),
        "format": status.get("format"),
        "checksum": status.get("checksum"),
    }
    return UploadResult(answer, await _sha256_of(path), already=True)


async def _sha256_of(path: str) -> str:
    try:
        if path == "-":
            hasher = StreamHasher(sys.stdin.buffer)
            try:
                return await hasher.hexdigest_of_the_rest()
            finally:
                hasher.close()
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            file_hasher = FileHasher(file.fileno(), size)
            try:
                return await file_hasher.hexdigest()
            finally:
                file_hasher.close()
    except OSError as exc:
        raise UploadFailed(f"cannot read {path}: {exc.strerror or exc}", EXIT_REFUSED) from None


def _expected_sha256(
    result: UploadResult, target: Target, args: Any, credentials: Credentials
) -> str | None:
    """The image's sha256: from the upload URL's answer, else from the API."""
    checksum = result.answer.get("checksum") or {}
    if checksum.get("sha256"):
        return str(checksum["sha256"])
    if target.kind is None or target.image is None:
        return None
    name = target.image["metadata"]["name"]
    image = _api_get(ApiClient(args.server, credentials), target.kind, args.namespace, name)
    result.answer["checksum"] = (image.get("status") or {}).get("checksum")
    return ((image.get("status") or {}).get("checksum") or {}).get("sha256")


def _check(result: UploadResult, expected: str | None, target: Target, args: Any) -> None:
    """Raises UploadFailed unless the image holds the file; says so on stderr."""
    what = "standard input" if args.file == "-" else args.file
    if expected is None:
        if result.already:
            raise UploadFailed(
                f"{target.label} is already Ready, and the upload URL does not tell its sha256, "
                f"so {what} cannot be compared with it; name the image instead of its URL "
                "(dvcr-uploader upload FILE vi/NAME) to compare through the API",
                EXIT_REFUSED,
            )
        # The upload went through, but its answer had no checksum: the user can compare.
        print(
            f"the server did not tell the image's sha256; {what}'s is {result.sha256}",
            file=sys.stderr,
        )
        return
    if expected != result.sha256:
        if result.already:
            why = (
                "it was Ready before this upload: to put this file in its place, delete the "
                "image and create it again"
            )
        else:
            why = "the bytes the server received are not those of the file"
        raise UploadFailed(
            f"checksum mismatch: {target.label} has sha256 {expected}, {what} has "
            f"{result.sha256}; {why}",
            EXIT_REFUSED,
        )
    if result.already:
        print(
            f"already uploaded: {target.label} is Ready and holds {what} (sha256 {expected})",
            file=sys.stderr,
        )
    else:
        print(f"sha256 {expected}: the image holds {what}", file=sys.stderr)
