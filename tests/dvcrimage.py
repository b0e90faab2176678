"""Reading a DVCR image back the way its consumers do: skopeo, then the tar layer."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any


def skopeo_copy(source: str, out: Path, *flags: str) -> dict[str, Any]:
    """`skopeo copy SOURCE dir:OUT`; returns the manifest."""
    subprocess.run(
        ["skopeo", "copy", *flags, source, f"dir:{out}"], check=True, capture_output=True
    )
    return json.loads((out / "manifest.json").read_text())


def check_image(out: Path, manifest: dict[str, Any], sha256: str) -> dict[str, str]:
    """Checks the layout of a copied DVCR image; returns its labels."""
    assert len(manifest["layers"]) == 1
    layer_desc = manifest["layers"][0]
    assert layer_desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    layer = out / layer_desc["digest"].removeprefix("sha256:")
    assert "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest() == layer_desc["digest"]
    with tarfile.open(layer) as tar:
        members = tar.getmembers()
        assert members[0].name == "disk"
        assert members[0].isdir()
        assert len(members) == 2
        disk = members[1]
        assert disk.name.startswith("disk/")
        assert disk.isfile()
        assert (disk.uid, disk.gid, disk.mode) == (107, 107, 0o444)
        extracted = tar.extractfile(disk)
        assert extracted is not None
        assert hashlib.sha256(extracted.read()).hexdigest() == sha256
    config = json.loads((out / manifest["config"]["digest"].removeprefix("sha256:")).read_text())
    assert config["rootfs"]["diff_ids"] == [layer_desc["digest"]]
    return config["config"]["Labels"]
