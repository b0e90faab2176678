"""The store on a data disk that something else filled: deletions still work."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import Server, manifest
from smallfs import small_filesystem

from uploader.errors import InsufficientStorage
from uploader.server.image_db import RESERVE_FILE, Store


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 24 MiB filesystem, which a test can fill."""
    with small_filesystem(tmp_path / "disk", 24 << 20) as mount:
        yield mount


def _fill(directory: Path) -> None:
    """Writes until the filesystem has no block left."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 64 << 10, 4 << 10, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\xff" * size)
    finally:
        os.close(fd)


def _image(name: str) -> dict:
    obj = manifest(name)
    obj["metadata"].update(namespace="default", uid=str(uuid.uuid4()), generation=1)
    obj["status"] = {"phase": "WaitForUserUpload", "padding": "p" * 4000}
    return obj


def test_a_full_disk_refuses_new_objects_but_deletes_with_the_reserve(small_disk: Path) -> None:
    store = Store(small_disk / "state.db")
    assert (small_disk / RESERVE_FILE).stat().st_size > 0
    store.save(_image("keep"))
    _fill(small_disk)
    with pytest.raises(InsufficientStorage):
        for i in range(10_000):
            store.save(_image(f"more-{i}"))
    deleted = store.delete(("VirtualImage", "default", "keep"))
    assert deleted is not None
    assert not (small_disk / RESERVE_FILE).exists()
    assert store.get(("VirtualImage", "default", "keep")) is None
    store.close()
    assert Store(small_disk / "state.db").get(("VirtualImage", "default", "keep")) is None


def test_the_server_on_a_full_disk_answers_and_frees(small_disk: Path) -> None:
    with Server(small_disk / "data").start() as srv:
        srv.create(manifest("old"))
        _fill(small_disk)
        codes = set()
        for i in range(200):
            code, status = srv.call("POST", srv.images_path(), manifest(f"new-{i}"))
            codes.add(code)
            if code != 201:
                assert (code, status["reason"]) == (507, "InsufficientStorage"), status
                break
        assert 507 in codes
        code, _ = srv.call("DELETE", srv.images_path(name="old"))
        assert code == 200
        srv.wait_gone("old")
        assert "Traceback" not in srv.log_path.read_text()
        (small_disk / "filler").unlink()
        srv.restart()
        srv.create(manifest("after"))


def _with_condition(obj: dict, phase: str, reason: str, message: str) -> dict:
    obj["status"] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "False", "reason": reason, "message": message}],
    }
    return obj


def test_events_follow_the_ready_condition_and_count_repeats(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    obj = _image("ev")
    key = ("VirtualImage", "default", "ev")
    steps = [
        ("WaitForUserUpload", "WaitForUserUpload", "Waiting for upload"),
        ("WaitForUserUpload", "WaitForUserUpload", "Waiting for upload"),  # no change
        ("Provisioning", "Provisioning", "Receiving the image"),
        ("WaitForUserUpload", "WaitForUserUpload", "interrupted"),
        ("Provisioning", "Provisioning", "Receiving the image"),  # a repeat
        ("Failed", "BadImageChecksum", "sha256 differs"),
    ]
    for phase, reason, message in steps:
        obj = store.save(_with_condition(obj, phase, reason, message))
    events = store.events.of(key)
    assert [(e.type, e.reason, e.count) for e in events] == [
        ("Normal", "WaitForUserUpload", 1),
        ("Normal", "WaitForUserUpload", 1),
        ("Normal", "Provisioning", 2),
        ("Warning", "BadImageChecksum", 1),
    ]
    assert [e.message for e in events[:2]] == ["Waiting for upload", "interrupted"]
    for number in range(20):
        obj = store.save(_with_condition(obj, "Pending", "Pending", f"step {number}"))
    assert len(store.events.of(key)) == 10
    assert store.events.of(key)[-1].message == "step 19"
    store.delete(key)
    assert store.events.of(key) == []
    store.close()
