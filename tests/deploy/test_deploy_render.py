"""Every kustomization under deploy/ renders with `kubectl kustomize`, and every document it
renders validates (see deploymanifests.py for how)."""

from __future__ import annotations

import copy

import pytest
from deploymanifests import DEPLOY, KUSTOMIZATIONS, render, validate


def test_every_kustomization_is_tested() -> None:
    found = {str(path.parent.relative_to(DEPLOY)) for path in DEPLOY.rglob("kustomization.yaml")}
    assert found == set(KUSTOMIZATIONS)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_and_validates(kustomization: str) -> None:
    rendered = render(kustomization)
    assert rendered.documents, f"deploy/{kustomization} rendered nothing"
    checked = {
        f"{doc['kind']}/{doc['metadata']['name']}": validate(doc) for doc in rendered.documents
    }
    assert len(checked) == len(rendered.documents), "two documents of one kind and name"


def test_validation_rejects_what_kubernetes_would() -> None:
    """The validation is not a formality: a broken copy of a rendered document fails it."""
    statefulset = copy.deepcopy(render("server/base").one("StatefulSet"))
    statefulset["spec"]["replicas"] = "one"
    with pytest.raises(AssertionError, match="replicas"):
        validate(statefulset)
    statefulset = copy.deepcopy(render("server/base").one("StatefulSet"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = (
        True
    )
    with pytest.raises(AssertionError, match="runAsNonroot"):
        validate(statefulset)
    monitor = copy.deepcopy(render("server/base").one("ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["bearerTokenFile"] = "/var/run/token"
    with pytest.raises(AssertionError, match="bearerTokenFile"):
        validate(monitor)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(AssertionError, match="no schema"):
        validate(unknown)
