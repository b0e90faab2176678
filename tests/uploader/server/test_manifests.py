"""Parsing manifests: JSON as JSON, YAML without aliases, bounded in size, depth and nodes."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from serverproc import Server, curl
from waiting import wait_until

from uploader.errors import ApiError, BadRequest
from uploader.server.manifests import (
    MAX_DEPTH,
    MAX_MANIFEST_SIZE,
    MAX_NODES,
    parse_manifest,
    parse_manifest_text,
)

ALIAS_BOMB = "\n".join(
    [
        'a: &a ["x","x","x","x","x","x","x","x","x"]',
        "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]",
        "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]",
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]",
        "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d]",
    ]
)


def _refused(text: str, content_type: str = "") -> str:
    with pytest.raises(BadRequest) as refused:
        parse_manifest_text(text, content_type)
    return refused.value.message


def test_json_and_yaml_give_the_same_document() -> None:
    assert parse_manifest_text('{"a": [1, "b"]}') == {"a": [1, "b"]}
    assert parse_manifest_text("a:\n- 1\n- b\n") == {"a": [1, "b"]}
    assert parse_manifest_text("{a: [1, b]}") == {"a": [1, "b"]}  # a YAML flow mapping


def test_invalid_json_declared_as_json_is_refused() -> None:
    assert "not valid JSON" in _refused("{a: 1}", "application/json")


def test_aliases_are_refused_before_anything_is_built() -> None:
    message = _refused(ALIAS_BOMB)
    assert "aliases" in message
    assert len(message) < 300


def test_depth_and_node_count_are_bounded() -> None:
    assert "deeper" in _refused("a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert parse_manifest_text("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))
    assert "deeper" in _refused("- " * (MAX_DEPTH + 1) + "x")
    assert "deeper" in _refused("[" * 100_000)
    many = "labels:\n" + "".join(f"  k{i}: v\n" for i in range(MAX_NODES))
    assert "nodes" in _refused(many)


def test_empty_and_multiple_documents_are_refused() -> None:
    assert "empty" in _refused("")
    assert "empty" in _refused("# only a comment\n")
    assert "2 YAML documents" in _refused("a: 1\n---\nb: 2\n")


def test_errors_quote_at_most_200_characters_of_the_input() -> None:
    message = _refused("a: [" + "x" * 50_000, "application/json")
    assert len(message) < 400
    message = _refused("a: b: c: " + "y" * 50_000)
    assert len(message) < 400


def test_a_body_over_the_limit_or_not_utf8_is_refused() -> None:
    async def parse(body: bytes) -> str:
        try:
            await parse_manifest(body)
        except ApiError as exc:
            return exc.message
        return ""

    assert "larger" in asyncio.run(parse(b"a" * (MAX_MANIFEST_SIZE + 1)))
    assert "UTF-8" in asyncio.run(parse(b"a: \xff\xfe"))


def test_big_manifests_do_not_stall_the_server(server: Server, tmp_path: Path) -> None:
    """Bodies as big as allowed, parsed meanwhile, leave /healthz answering at once."""
    body = tmp_path / "big.yaml"
    items = "".join(f"    k{i}: {'v' * 40}\n" for i in range(MAX_NODES // 2 - 50))
    body.write_text(f"apiVersion: x\nkind: y\nmetadata:\n  labels:\n{items}")
    assert body.stat().st_size < MAX_MANIFEST_SIZE
    stop = threading.Event()

    posted: list[int] = []

    def post_forever() -> None:
        while not stop.is_set():
            code, _ = curl(
                "-X", "POST", "--data-binary", f"@{body}", server.url + server.images_path()
            )
            assert code in (400, 422)
            posted.append(code)

    posters = [threading.Thread(target=post_forever) for _ in range(4)]
    for poster in posters:
        poster.start()
    try:
        wait_until(lambda: len(posted) >= len(posters), what="the bodies to be posted")
        slowest = 0.0
        for _ in range(20):
            started = time.monotonic()
            assert curl("-o", "/dev/null", server.url + "/healthz")[0] == 200
            slowest = max(slowest, time.monotonic() - started)
        # Before, one such body held the event loop for seconds.
        assert slowest < 1.0, slowest
    finally:
        stop.set()
        for poster in posters:
            poster.join()
