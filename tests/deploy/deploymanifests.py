"""The manifests under deploy/, rendered by the real `kubectl kustomize` and validated offline.

Every document is validated strictly (unknown fields rejected) with kubernetes-validate against
the newest Kubernetes version the installed release bundles. kubernetes-validate has no schema
for a custom resource; the one custom kind used here, the Prometheus Operator's ServiceMonitor,
is validated against `data/servicemonitor-fields.schema.json`, a JSON schema of the fields these
manifests use (written for these tests, stricter than the CRD: it rejects any other field). Any
other kind without a schema fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate.utils as kv  # type: ignore[import-untyped]
import pytest
import yaml
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SERVICE_MONITOR_SCHEMA = Path(__file__).with_name("data") / "servicemonitor-fields.schema.json"

# Every kustomization a user may apply; a new one must be added here to be tested.
SERVER_OVERLAYS = ("server/overlays/embedded-dvcr", "server/overlays/registry-dvcr")
DECKHOUSE_REFERENCES = ("deckhouse/uploader", "deckhouse/importer")
KUSTOMIZATIONS = ("server/base", *SERVER_OVERLAYS, *DECKHOUSE_REFERENCES)

# The oldest Kubernetes these manifests are validated against counts as current.
OLDEST_CURRENT_KUBERNETES = Version("1.34")

Manifest = dict[str, Any]


class RenderError(AssertionError):
    """`kubectl kustomize` refused a kustomization."""


@dataclass(frozen=True)
class Rendered:
    """The documents of one rendered kustomization."""

    kustomization: str
    documents: tuple[Manifest, ...]

    def of_kind(self, kind: str) -> list[Manifest]:
        return [doc for doc in self.documents if doc["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Manifest:
        found = [d for d in self.of_kind(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"{self.kustomization}: expected one {kind} {name or ''}, found {len(found)}"
        )
        return found[0]


def kubectl() -> str:
    """The kubectl that renders: $KUBECTL, else the one on PATH. Missing: the test fails."""
    path = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not path:
        pytest.fail(
            "kubectl is missing: the deploy/ manifests are rendered with `kubectl kustomize` "
            "(apt-get install -y kubernetes-client)"
        )
    return path


@cache
def render(kustomization: str) -> Rendered:
    """`kubectl kustomize deploy/KUSTOMIZATION`, parsed."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize deploy/{kustomization} failed:\n{result.stderr}")
    documents = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)
    return Rendered(kustomization, documents)


def kubernetes_version() -> str:
    """The newest Kubernetes version the installed kubernetes-validate bundles."""
    newest: str = kv.latest_version()
    if Version(newest) < OLDEST_CURRENT_KUBERNETES:
        pytest.fail(
            f"kubernetes-validate bundles Kubernetes up to {newest} only; "
            f"{OLDEST_CURRENT_KUBERNETES} or newer is needed (pip install -U kubernetes-validate)"
        )
    return newest


@cache
def _service_monitor_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SERVICE_MONITOR_SCHEMA.read_text())
    return schema


def validate(doc: Manifest) -> str:
    """Validate one document; return what it was validated against, or raise AssertionError."""
    what = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion") == "monitoring.coreos.com/v1" and doc.get("kind") == "ServiceMonitor":
        try:
            jsonschema.validate(doc, _service_monitor_schema())
        except jsonschema.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            raise AssertionError(f"{what}: {path}: {exc.message}") from None
        return SERVICE_MONITOR_SCHEMA.name
    version = kubernetes_version()
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise AssertionError(
            f"{what} against Kubernetes {version}: {path}: {exc.message}"
        ) from None
    except kv.SchemaNotFoundError as exc:
        raise AssertionError(f"{what}: no schema to validate it: {exc.message}") from None
    return f"Kubernetes {version}"


def container(pod_spec: Manifest, name: str) -> Manifest:
    found: list[Manifest] = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}, found {len(found)}"
    return found[0]


def env_of(container_spec: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container_spec.get("env", [])}


def ports_of(container_spec: Manifest) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container_spec.get("ports", [])}


def flags_of(args: list[str]) -> dict[str, str]:
    """`--name=value` arguments as {name: value} (the last one wins, as argparse does)."""
    flags: dict[str, str] = {}
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            flags[name] = value
    return flags
