"""`dvcr-uploader upload FILE URL`: stream a file to an upload URL with a progress bar."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import BinaryIO

import aiohttp
from tqdm import tqdm

CHUNK = 1 << 20

EXIT_OK = 0
EXIT_REFUSED = 1  # the server refused or failed the image; sending again will not help
EXIT_NETWORK = 3  # the connection failed; sending again may help


class UploadFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


async def _read(stream: BinaryIO, bar: tqdm) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    while chunk := await loop.run_in_executor(None, stream.read, CHUNK):
        bar.update(len(chunk))
        yield chunk


async def upload(path: str, url: str, *, quiet: bool = False, insecure: bool = False) -> dict:
    """Sends the whole file; returns the server's answer. Raises UploadFailed."""
    stream: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    try:
        size = None if path == "-" else os.fstat(stream.fileno()).st_size
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        bar = tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=quiet,
            desc=os.path.basename(path) if path != "-" else "stdin",
            file=sys.stderr,
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
        connector = aiohttp.TCPConnector(ssl=False) if insecure else None
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
                session.put(url, data=_read(stream, bar), headers=headers) as response,
            ):
                text = await response.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UploadFailed(
                f"upload failed: {exc or type(exc).__name__}", EXIT_NETWORK
            ) from None
        finally:
            bar.close()
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {"message": text.strip()}
    if response.status >= 400:
        reason = answer.get("reason", response.reason)
        message = answer.get("message", text.strip())
        code = EXIT_NETWORK if response.status >= 500 else EXIT_REFUSED
        raise UploadFailed(f"upload refused ({response.status} {reason}): {message}", code)
    return answer
