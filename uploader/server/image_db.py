"""Durable state of the images: SQLite in the data directory, mirrored in memory, with
watchers that get every change, and each image's recent events (uploader/server/events.py),
which every saved change is shown to."""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import copy
import json
import logging
import os
import sqlite3
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uploader.errors import InsufficientStorage
from uploader.server.events import ImageEvents
from uploader.server.upload_tokens import ImageKey

log = logging.getLogger(__name__)
Object = dict[str, Any]
_WATCH_QUEUE = 1024
# Room kept on the data disk for the writes that free space: when something else fills the
# disk, deleting an image still needs to write its Terminating phase and the deletion.
RESERVE_FILE = "reserve.space"
RESERVE_SIZE = 8 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    record TEXT NOT NULL,
    sink BLOB NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS received (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
"""


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


def key_of(obj: Object) -> ImageKey:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


@dataclass
class Event:
    type: str  # ADDED | MODIFIED | DELETED
    object: Object

    def to_json(self) -> str:
        return json.dumps({"type": self.type, "object": self.object}, separators=(",", ":"))


@dataclass(eq=False)
class _Watcher:
    kind: str
    namespace: str | None
    name: str | None
    queue: asyncio.Queue[Event | None] = field(default_factory=lambda: asyncio.Queue(_WATCH_QUEUE))

    def wants(self, key: ImageKey) -> bool:
        kind, namespace, name = key
        return (
            kind == self.kind
            and (self.namespace is None or namespace == self.namespace)
            and (self.name is None or name == self.name)
        )


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._objects: dict[ImageKey, Object] = {}
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for (body,) in self._db.execute("SELECT body FROM objects"):
            obj = json.loads(body)
            self._objects[key_of(obj)] = obj
            self._counts[key_of(obj)[:2]] += 1
        self._reserve = path.parent / RESERVE_FILE
        self.keep_reserve()
        row = self._db.execute("SELECT value FROM meta WHERE key='resourceVersion'").fetchone()
        self._version = int(row[0]) if row else 0
        self._watchers: set[_Watcher] = set()
        self.events = ImageEvents()

    def keep_reserve(self) -> None:
        """Makes the reserve again if it is not there (once space was freed)."""
        if self._reserve.exists():
            return
        partial = self._reserve.with_suffix(".partial")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_SIZE)
            finally:
                os.close(fd)
            os.replace(partial, self._reserve)
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink()
            log.warning("no reserve space on the data disk: %s", exc.strerror)

    def _write(self, action: Callable[[], None], essential: bool) -> None:
        """Runs a database write; on a full disk an `essential` one (a write that frees
        space) gives up the reserve and tries again, any other is InsufficientStorage."""
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc):
                raise
            if not essential or not self._release_reserve():
                raise InsufficientStorage(
                    "the server's data disk is full: delete images to free space"
                ) from None
        log.warning("the data disk is full: the reserve space was used for a deletion")
        action()

    def _release_reserve(self) -> bool:
        try:
            self._reserve.unlink()
        except FileNotFoundError:
            return False
        return True

    def count(self, kind: str, namespace: str | None = None) -> int:
        """How many objects of `kind` there are (in `namespace`, if given)."""
        if namespace is not None:
            return self._counts[(kind, namespace)]
        return sum(n for (k, _), n in self._counts.items() if k == kind)

    def end_watches(self) -> None:
        """Ends every watch stream (on shutdown; clients watch again)."""
        for watcher in list(self._watchers):
            self._close_watcher(watcher)

    def close(self) -> None:
        self.end_watches()
        self._db.close()

    def get(self, key: ImageKey) -> Object | None:
        obj = self._objects.get(key)
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, kind: str, namespace: str | None = None) -> list[Object]:
        return [copy.deepcopy(obj) for obj in self._select(kind, namespace)]

    def _select(self, kind: str, namespace: str | None) -> Iterator[Object]:
        for (k, ns, _), obj in sorted(self._objects.items()):
            if k == kind and (namespace is None or ns == namespace):
                yield obj

    def all(self) -> builtins.list[Object]:
        return [copy.deepcopy(obj) for obj in self._objects.values()]

    @property
    def version(self) -> int:
        return self._version

    def save(self, obj: Object, durable: bool = True, essential: bool = False) -> Object:
        """Stores a new or changed object, bumps its resourceVersion, tells the watchers.
        `durable=False` keeps the change in memory only: for progress, which a restart
        resets anyway, so a transfer never waits for an fsync of the database.
        `essential`: a step of a deletion, which may use the reserve of a full disk."""
        key = key_of(obj)
        event_type = "MODIFIED" if key in self._objects else "ADDED"
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._version + 1)
        if durable:
            self._write(lambda: self._persist(key, obj, self._version + 1), essential)
        self._version += 1
        if key not in self._objects:
            self._counts[key[:2]] += 1
        self.events.observe(key, self._objects.get(key), obj)
        self._objects[key] = obj
        self._notify(Event(event_type, obj))
        return copy.deepcopy(obj)

    def _persist(self, key: ImageKey, obj: Object, version: int) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO objects (kind, namespace, name, body) VALUES (?,?,?,?)",
                (*key, json.dumps(obj)),
            )
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('resourceVersion', ?)",
                (str(version),),
            )

    def set_received(self, key: ImageKey, count: int) -> None:
        """Bytes taken from the sender for the image (kept out of the object itself)."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO received (kind, namespace, name, bytes) VALUES (?,?,?,?)",
                (*key, count),
            )

    def received(self, key: ImageKey) -> int:
        row = self._db.execute(
            "SELECT bytes FROM received WHERE kind=? AND namespace=? AND name=?", key
        ).fetchone()
        return int(row[0]) if row else 0

    def save_checkpoint(self, key: ImageKey, record: dict[str, Any], sink: bytes) -> None:
        """Where an upload can continue after a restart (durable before this returns)."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints (kind, namespace, name, record, sink) "
                "VALUES (?,?,?,?,?)",
                (*key, json.dumps(record), sink),
            )

    def checkpoint(self, key: ImageKey) -> tuple[dict[str, Any], bytes] | None:
        row = self._db.execute(
            "SELECT record, sink FROM checkpoints WHERE kind=? AND namespace=? AND name=?", key
        ).fetchone()
        return (json.loads(row[0]), bytes(row[1])) if row else None

    def drop_checkpoint(self, key: ImageKey) -> None:
        with self._db:
            self._db.execute("DELETE FROM checkpoints WHERE kind=? AND namespace=? AND name=?", key)

    def delete(self, key: ImageKey) -> Object | None:
        obj = self._objects.get(key)
        if obj is None:
            return None

        def remove() -> None:
            with self._db:
                for table in ("objects", "received", "checkpoints"):
                    self._db.execute(
                        f"DELETE FROM {table} WHERE kind=? AND namespace=? AND name=?", key
                    )

        self._write(remove, essential=True)
        del self._objects[key]
        self.events.forget(key)
        self._counts[key[:2]] -= 1
        self._notify(Event("DELETED", obj))
        return copy.deepcopy(obj)

    def _notify(self, event: Event) -> None:
        key = key_of(event.object)
        for watcher in list(self._watchers):
            if not watcher.wants(key):
                continue
            try:
                watcher.queue.put_nowait(Event(event.type, copy.deepcopy(event.object)))
            except asyncio.QueueFull:
                # A watcher that cannot keep up is ended; the client watches again.
                self._close_watcher(watcher)

    def _close_watcher(self, watcher: _Watcher) -> None:
        self._watchers.discard(watcher)
        with contextlib.suppress(asyncio.QueueFull):
            watcher.queue.put_nowait(None)

    async def watch(
        self, kind: str, namespace: str | None, name: str | None = None
    ) -> AsyncGenerator[Event, None]:
        """Every matching object as ADDED, then each change as it happens."""
        watcher = _Watcher(kind, namespace, name)
        for obj in self._select(kind, namespace):
            if watcher.wants(key_of(obj)):
                watcher.queue.put_nowait(Event("ADDED", copy.deepcopy(obj)))
        self._watchers.add(watcher)
        try:
            while True:
                event = await watcher.queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._watchers.discard(watcher)
