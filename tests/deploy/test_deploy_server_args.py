"""The real server, started with the arguments and the token file of the rendered StatefulSet:
only the addresses, the paths of the volumes and $(VARIABLES) are put on this machine."""

from __future__ import annotations

import base64
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from deploymanifests import SERVER_OVERLAYS, container, env_of, render
from serverproc import Server, free_port


def expand(arg: str, values: dict[str, str]) -> str:
    """Kubernetes' $(NAME) expansion in container arguments."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: values[m.group(1)], arg)


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("overlay", ["server/overlays/embedded-dvcr"])
def test_server_starts_with_the_rendered_arguments(overlay: str, tmp_path: Path) -> None:
    assert overlay in SERVER_OVERLAYS
    rendered = render(overlay)
    spec = rendered.one("StatefulSet")["spec"]["template"]["spec"]
    server_spec = container(spec, "server")
    env = env_of(server_spec)
    ref = env["EXTERNAL_URL"]["valueFrom"]["configMapKeyRef"]
    values = {
        "EXTERNAL_URL": rendered.one("ConfigMap", ref["name"])["data"][ref["key"]],
        "POD_NAMESPACE": "dvcr-uploader",
    }
    # The volumes, as directories here; a Secret's keys as its files.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in server_spec["volumeMounts"]:
        local = tmp_path / mount["name"]
        local.mkdir()
        secret_volume = volumes.get(mount["name"], {}).get("secret")
        if secret_volume is not None:
            secret = rendered.one("Secret", secret_volume["secretName"])
            for key, data in secret["data"].items():
                (local / key).write_bytes(base64.b64decode(data))
        mounts[mount["mountPath"]] = local
    api_port, metrics_port = free_port(), free_port()
    args: list[str] = []
    for arg in server_spec["args"][1:]:
        arg = expand(arg, values)
        name, _, value = arg.partition("=")
        if name in ("--listen", "--data-dir"):
            continue  # Server gives its own
        if name == "--api-listen":
            value = f"127.0.0.1:{api_port}"
        elif name == "--metrics-listen":
            value = f"127.0.0.1:{metrics_port}"
        else:
            for mount_path, local in mounts.items():
                if value.startswith(mount_path + "/"):
                    value = str(local) + value[len(mount_path) :]
        args.append(f"{name}={value}")
    data_dir_flag = next(a for a in server_spec["args"] if a.startswith("--data-dir="))
    data_dir = mounts[data_dir_flag.split("=", 1)[1]]
    with Server(data_dir, *args) as server:
        server.start()
        assert status_of(f"{server.url}/healthz") == 200
        # The upload listener does not serve the API; the API listener wants a token.
        assert (
            status_of(f"{server.url}/apis/virtualization.deckhouse.io/v1alpha2/virtualimages")
            == 404
        )
        api = f"http://127.0.0.1:{api_port}"
        assert status_of(f"{api}/apis/virtualization.deckhouse.io/v1alpha2/virtualimages") == 401
        assert status_of(f"http://127.0.0.1:{metrics_port}/metrics") == 401
        assert status_of(f"http://127.0.0.1:{metrics_port}/healthz") == 200
        # No admin token is written: the token file is the only way in.
        assert not (data_dir / "admin.token").exists()
