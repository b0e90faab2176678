"""Load: 32 uploads at once into one server while a client lists the images 100 times a
second. Every upload must end Ready with its own bytes, no list request may fail, and the
server's memory must stay bounded; the peak is printed (pytest -s) for the notes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from diskimages import MiB, sha256_file
from dvcrimage import check_image
from serverproc import Server, background_upload, manifest

UPLOADS = 32
SIZE = 16 * MiB
RATE = "512K"  # per upload: about 32 s for 16 MiB, so the uploads overlap for real
LIST_RATE = 100  # list requests per second
PEAK_RSS_LIMIT = 400 * MiB


class Lister:
    """GETs the image list `LIST_RATE` times a second until stopped; counts what failed."""

    def __init__(self, server: Server) -> None:
        self.url = server.url + server.images_path()
        self.polls = 0
        self.errors: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Lister:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.seconds = time.monotonic() - self.started

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    listed = json.loads(response.read())
                if response.status != 200 or listed.get("kind") != "VirtualImageList":
                    self.errors.append(f"{response.status} {str(listed)[:200]}")
                elif len(listed["items"]) != UPLOADS:
                    self.errors.append(f"{len(listed['items'])} items")
            except Exception as exc:
                self.errors.append(repr(exc))
            self.polls += 1
            self.slowest = max(self.slowest, time.monotonic() - began)
            next_at += 1 / LIST_RATE
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def check_layout_image(server: Server, obj: dict, sha256: str) -> None:
    """Reads the image straight from the embedded OCI layout (skopeo would take longer)."""
    layout = server.data_dir / "dvcr"
    ref = obj["status"]["target"]["registryURL"].rsplit(":", 2)
    name = f"{ref[1]}:{ref[2]}"
    index = json.loads((layout / "index.json").read_text())
    digests = [
        m["digest"]
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == name
    ]
    assert len(digests) == 1, name
    blobs = layout / "blobs" / "sha256"
    image_manifest = json.loads((blobs / digests[0].removeprefix("sha256:")).read_text())
    check_image(blobs, image_manifest, sha256)


def test_32_uploads_at_once_while_a_client_lists_the_images(
    tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    server = Server(tmp_path / "data").start()
    try:
        files = []
        for i in range(UPLOADS):
            path = tmp_path / f"disk{i}.raw"
            data = os.urandom(SIZE)
            path.write_bytes(data)
            storage = "PersistentVolumeClaim" if i % 2 == 0 else "ContainerRegistry"
            server.create(manifest(f"load-{i}", storage=storage))
            files.append((path, hashlib.sha256(data).hexdigest(), storage))
        urls = [server.upload_url(f"load-{i}") for i in range(UPLOADS)]
        baseline = server.rss()

        started = time.monotonic()
        with Lister(server) as lister:
            procs = [
                background_upload(path, url, RATE)
                for (path, _, _), url in zip(files, urls, strict=True)
            ]
            codes = [proc.communicate(timeout=300)[0] for proc in procs]
        seconds = time.monotonic() - started
        peak = server.peak_rss()

        rate = lister.polls / lister.seconds
        report = (
            f"{UPLOADS} uploads of {SIZE // MiB} MiB at {RATE}/s each: {seconds:.1f} s; "
            f"server peak RSS {peak / MiB:.0f} MiB (idle before {baseline / MiB:.0f} MiB); "
            f"list requests {lister.polls} ({rate:.0f}/s), slowest {lister.slowest * 1000:.0f} ms"
        )
        print("\n" + report)
        record_property("load_report", report)
        record_property("peak_rss_bytes", peak)

        assert codes == [b"200"] * UPLOADS
        assert lister.errors == []
        assert lister.polls >= LIST_RATE * seconds * 0.5, report  # it really kept asking
        for i, (_, sha256, storage) in enumerate(files):
            obj = server.get(f"load-{i}")
            assert obj["status"]["phase"] == "Ready"
            assert obj["status"]["checksum"]["sha256"] == sha256
            if storage == "PersistentVolumeClaim":
                assert sha256_file(server.claim_dir(f"load-{i}") / "disk.img") == sha256
            else:
                check_layout_image(server, obj, sha256)
        assert peak < PEAK_RSS_LIMIT, report
    finally:
        server.stop()
