"""Durable state of the images: SQLite in the data directory, mirrored in memory, with
watchers that get every change."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uploader.tokens import ImageKey

Object = dict[str, Any]
_WATCH_QUEUE = 1024

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
        for (body,) in self._db.execute("SELECT body FROM objects"):
            obj = json.loads(body)
            self._objects[key_of(obj)] = obj
        row = self._db.execute("SELECT value FROM meta WHERE key='resourceVersion'").fetchone()
        self._version = int(row[0]) if row else 0
        self._watchers: set[_Watcher] = set()

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

    def all(self) -> list[Object]:
        return [copy.deepcopy(obj) for obj in self._objects.values()]

    @property
    def version(self) -> int:
        return self._version

    def save(self, obj: Object, durable: bool = True) -> Object:
        """Stores a new or changed object, bumps its resourceVersion, tells the watchers.
        `durable=False` keeps the change in memory only: for progress, which a restart
        resets anyway, so a transfer never waits for an fsync of the database."""
        key = key_of(obj)
        event_type = "MODIFIED" if key in self._objects else "ADDED"
        self._version += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._version)
        if durable:
            self._persist(key, obj)
        self._objects[key] = obj
        self._notify(Event(event_type, obj))
        return copy.deepcopy(obj)

    def _persist(self, key: ImageKey, obj: Object) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO objects (kind, namespace, name, body) VALUES (?,?,?,?)",
                (*key, json.dumps(obj)),
            )
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('resourceVersion', ?)",
                (str(self._version),),
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
        obj = self._objects.pop(key, None)
        if obj is None:
            return None
        with self._db:
            self._db.execute("DELETE FROM objects WHERE kind=? AND namespace=? AND name=?", key)
            self._db.execute("DELETE FROM received WHERE kind=? AND namespace=? AND name=?", key)
            self._db.execute("DELETE FROM checkpoints WHERE kind=? AND namespace=? AND name=?", key)
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
    ) -> AsyncIterator[Event]:
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
