"""under(): paths built from names stay below their root, on a real filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uploader.server.paths import UnsafePath, under


@pytest.mark.parametrize(
    "parts",
    [("..",), ("ns", ".."), (".",), ("",), ("a/b",), ("../x",), ("ns", "x\0y"), ("v" * 256,)],
)
def test_a_part_that_is_no_file_name_is_refused(tmp_path: Path, parts: tuple[str, ...]) -> None:
    with pytest.raises(UnsafePath):
        under(tmp_path, *parts)


def test_a_long_name_is_counted_in_bytes(tmp_path: Path) -> None:
    assert under(tmp_path, "x" * 255) == tmp_path / ("x" * 255)
    with pytest.raises(UnsafePath, match="255 bytes"):
        under(tmp_path, "é" * 128)  # 256 bytes


def test_a_path_below_the_root(tmp_path: Path) -> None:
    assert under(tmp_path / "pvc", "ns", "vi-a.b--c") == tmp_path / "pvc" / "ns" / "vi-a.b--c"


def test_a_linked_directory_on_the_way_out_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "ns").symlink_to(outside)
    with pytest.raises(UnsafePath, match="leads outside"):
        under(root, "ns", "vi-x")


def test_the_root_itself_may_be_a_link(tmp_path: Path) -> None:
    real = tmp_path / "big-disk"
    real.mkdir()
    (tmp_path / "pvc").symlink_to(real)
    assert under(tmp_path / "pvc", "ns", "vi-x") == tmp_path / "pvc" / "ns" / "vi-x"


def test_a_final_link_is_followed_only_when_asked(tmp_path: Path) -> None:
    """A mounted secret may be a link to elsewhere; a claim directory may not."""
    root = tmp_path / "root"
    (root / "ns").mkdir(parents=True)
    (root / "ns" / "vi-x").symlink_to("/tmp")
    assert under(root, "ns", "vi-x") == root / "ns" / "vi-x"
    with pytest.raises(UnsafePath):
        under(root, "ns", "vi-x", follow_last=True)
    os.unlink(root / "ns" / "vi-x")
    (root / "ns" / "vi-x").mkdir()
    assert under(root, "ns", "vi-x", follow_last=True) == root / "ns" / "vi-x"
