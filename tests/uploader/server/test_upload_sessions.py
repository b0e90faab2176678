"""The upload state machine (uploader/server/upload_sessions.py), driven without HTTP:
parts are in-memory readers, the storage a claim directory under tmp_path."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from importer.errors import TransferError, TransferInterrupted
from importer.metrics import Metrics
from importer.sources.reader import ChunkReader, Reader
from uploader.errors import ApiError, BadRequest, Conflict, Gone, NotFound, RangeNotSatisfiable
from uploader.resources import VIRTUAL_IMAGE
from uploader.server.config import ServerConfig
from uploader.server.image_db import Store
from uploader.server.image_model import FAILED, READY, WAIT_FOR_UPLOAD
from uploader.server.images import Images
from uploader.server.upload_feed import BodyEnd
from uploader.server.upload_sessions import UploadPart

SIZE = 3 << 20
NAMESPACE = "ns"


def _wrong_offset(offset: int) -> ApiError:
    return RangeNotSatisfiable(f"continue at {offset}", offset=offset)


async def _pieces(data: bytes, piece: int = 256 << 10) -> AsyncIterator[bytes]:
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


def body_of(data: bytes) -> Reader:
    return ChunkReader(_pieces(data))


class BrokenBody:
    """A body whose connection breaks off after `data`, as a dropped client's does."""

    def __init__(self, data: bytes) -> None:
        self._reader = body_of(data)

    async def readinto(self, view: memoryview) -> int:
        n = await self._reader.readinto(view)
        if n == 0:
            raise TransferInterrupted("the connection broke off")
        return n


class HeldBody:
    """A body that sends nothing until released: a client that is still sending."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def readinto(self, view: memoryview) -> int:
        await self.release.wait()
        raise TransferInterrupted("the connection broke off")


def whole(data: bytes) -> UploadPart:
    return UploadPart(body_of(data), 0, len(data), True, _wrong_offset, length=len(data))


def ranged(body: Reader, start: int, length: int, total: int) -> UploadPart:
    return UploadPart(body, start, total, False, _wrong_offset, length=length)


def manifest(name: str, checksum: dict[str, str] | None = None) -> dict[str, object]:
    upload: dict[str, object] = {"checksum": checksum} if checksum else {}
    return {
        "apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": "VirtualImage",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "storage": "PersistentVolumeClaim",
            "dataSource": {"type": "Upload", **({"upload": upload} if upload else {})},
        },
    }


@pytest.fixture
async def images(tmp_path: Path) -> AsyncIterator[Images]:
    config = ServerConfig(data_dir=tmp_path, status_interval=0.05, checkpoint_every=0)
    store = Store(config.db_path)
    service = Images(config, store, Metrics())
    await service.start("http://127.0.0.1:1")
    yield service
    await service.stop()
    store.close()


@pytest.fixture
def data() -> bytes:
    return os.urandom(SIZE)


async def create(images: Images, name: str, checksum: dict[str, str] | None = None) -> str:
    created = await images.lifecycle.create(VIRTUAL_IMAGE, NAMESPACE, manifest(name, checksum))
    url = created["status"]["imageUploadURLs"]["external"]
    assert created["status"]["phase"] == WAIT_FOR_UPLOAD
    return str(url).rsplit("/", 1)[-1]


def stored(tmp_path: Path, name: str) -> bytes:
    return (tmp_path / "pvc" / NAMESPACE / f"vi-{name}" / "disk.img").read_bytes()


async def test_a_whole_image_in_one_part_makes_it_ready(
    images: Images, data: bytes, tmp_path: Path
) -> None:
    token = await create(images, "one")
    images.uploads.admit(token, whole(data))
    how, done = await images.uploads.receive(token, whole(data))
    assert how is BodyEnd.COMPLETE and done is not None
    assert done.phase == READY
    assert done.status["checksum"]["sha256"] == hashlib.sha256(data).hexdigest()
    state = images.uploads.state(images.uploads.lookup(token))
    assert (state.phase, state.offset, state.length) == (READY, SIZE, SIZE)
    assert stored(tmp_path, "one") == data
    with pytest.raises(Conflict, match="already Ready"):
        images.uploads.find(token)


async def test_parts_continue_where_the_last_one_stopped(
    images: Images, data: bytes, tmp_path: Path
) -> None:
    token = await create(images, "parts")
    half = SIZE // 2
    how, done = await images.uploads.receive(token, ranged(body_of(data[:half]), 0, half, SIZE))
    assert (how, done) == (BodyEnd.PARTIAL, None)
    assert images.uploads.offset(images.uploads.find(token).key) == half
    assert images.uploads.state(images.uploads.lookup(token)).length == SIZE

    with pytest.raises(RangeNotSatisfiable) as wrong:
        images.uploads.admit(token, ranged(body_of(data), 0, SIZE, SIZE))
    assert wrong.value.headers["Upload-Offset"] == str(half)
    with pytest.raises(BadRequest, match=f"this upload is {SIZE} bytes long"):
        images.uploads.admit(token, ranged(body_of(b"x"), half, 1, SIZE + 1))

    rest = ranged(body_of(data[half:]), half, SIZE - half, SIZE)
    images.uploads.admit(token, rest)
    how, done = await images.uploads.receive(token, rest)
    assert how is BodyEnd.COMPLETE and done is not None and done.phase == READY
    assert stored(tmp_path, "parts") == data


async def test_a_broken_body_leaves_the_upload_waiting_at_what_it_took(
    images: Images, data: bytes, tmp_path: Path
) -> None:
    token = await create(images, "broken")
    cut = SIZE // 3
    how, done = await images.uploads.receive(token, ranged(BrokenBody(data[:cut]), 0, cut, SIZE))
    assert (how, done) == (BodyEnd.BROKEN, None)
    image = images.uploads.find(token)
    assert images.uploads.offset(image.key) == cut
    assert image.phase == WAIT_FOR_UPLOAD
    assert f"stopped at byte {cut} of {SIZE}" in (image.ready_condition() or {})["message"]

    rest = ranged(body_of(data[cut:]), cut, SIZE - cut, SIZE)
    how, done = await images.uploads.receive(token, rest)
    assert how is BodyEnd.COMPLETE and done is not None
    assert stored(tmp_path, "broken") == data


async def test_a_second_sender_is_refused_while_the_first_one_sends(
    images: Images, data: bytes
) -> None:
    token = await create(images, "busy")
    held = HeldBody()
    first = asyncio.create_task(images.uploads.receive(token, ranged(held, 0, SIZE, SIZE)))
    await asyncio.sleep(0)
    for _ in range(100):
        transfer = images.transfers.get(images.uploads.find(token).key)
        if transfer is not None and transfer.feed is not None and transfer.feed.attached:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(Conflict, match="in progress") as busy:
        images.uploads.admit(token, ranged(body_of(data), 0, SIZE, SIZE))
    assert busy.value.headers["Upload-Offset"] == "0"
    held.release.set()
    how, _ = await first
    assert how is BodyEnd.BROKEN


async def test_a_failed_upload_answers_gone_with_its_reason(images: Images, data: bytes) -> None:
    token = await create(images, "bad", checksum={"sha256": "0" * 64})
    with pytest.raises(TransferError) as failed:
        await images.uploads.receive(token, whole(data))
    assert "checksum" in failed.value.message.lower() or "sha256" in failed.value.message
    image = images.lifecycle.get(VIRTUAL_IMAGE, NAMESPACE, "bad")
    assert image["status"]["phase"] == FAILED
    with pytest.raises(Gone) as gone:
        images.uploads.find(token)
    assert gone.value.reason == image["status"]["conditions"][0]["reason"]


async def test_a_new_spec_gives_a_new_upload_url(images: Images, data: bytes) -> None:
    old = await create(images, "respec")
    changed = manifest("respec", checksum={"sha256": hashlib.sha256(data).hexdigest()})
    replaced = await images.lifecycle.replace(VIRTUAL_IMAGE, NAMESPACE, "respec", changed)
    new = replaced["status"]["imageUploadURLs"]["external"].rsplit("/", 1)[-1]
    assert new != old
    with pytest.raises(NotFound):
        images.uploads.find(old)
    how, done = await images.uploads.receive(new, whole(data))
    assert how is BodyEnd.COMPLETE and done is not None and done.phase == READY


async def test_a_declared_length_lives_only_as_long_as_the_upload_waits(
    images: Images, data: bytes
) -> None:
    token = await create(images, "declared")
    key = images.uploads.find(token).key
    images.uploads.create(token, SIZE)
    assert images.uploads.state(images.uploads.find(token)).length == SIZE
    await images.lifecycle.delete(VIRTUAL_IMAGE, NAMESPACE, "declared")
    assert images.uploads.tokens.declared(key) is None

    token = await create(images, "declared")  # the same name again: nothing carried over
    assert images.uploads.state(images.uploads.find(token)).length is None
    images.uploads.create(token, None)
    assert images.uploads.tokens.deferred(key)
    changed = manifest("declared", checksum={"sha256": hashlib.sha256(data).hexdigest()})
    await images.lifecycle.replace(VIRTUAL_IMAGE, NAMESPACE, "declared", changed)
    assert not images.uploads.tokens.deferred(key)

    status = images.lifecycle.get(VIRTUAL_IMAGE, NAMESPACE, "declared")["status"]
    token = status["imageUploadURLs"]["external"].rsplit("/", 1)[-1]
    images.uploads.create(token, SIZE)
    how, done = await images.uploads.receive(token, whole(data))
    assert how is BodyEnd.COMPLETE and done is not None and done.phase == READY
    assert images.uploads.tokens.declared(key) is None
