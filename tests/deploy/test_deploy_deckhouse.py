"""The reference objects of Deckhouse's controller under deploy/deckhouse/: its names, ports and
environment, and our importer run exactly as the importer pod runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from deploymanifests import Manifest, Rendered, container, env_of, ports_of, render
from diskimages import MiB, write_disk_image
from nginxproc import Nginx
from registryproc import Registry
from serverproc import free_port

# CONTRACT section 8: the variables of Deckhouse's uploader, and UPLOADER_CHECKSUMS, which the
# newest controller sets when the image's spec has checksums.
UPLOADER_VARIABLES = {
    "LISTEN_ADDRESS",
    "LISTEN_PORT",
    "HEALTHZ_PORT",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "CLIENT_CA_FILE",
    "CLIENT_NAME",
    "UPLOADER_DESTINATION_ENDPOINT",
    "UPLOADER_DESTINATION_ACCESS_KEY_ID",
    "UPLOADER_DESTINATION_SECRET_KEY",
    "UPLOADER_DESTINATION_AUTH_CONFIG",
    "DESTINATION_INSECURE_TLS",
    "UPLOADER_DESTINATION_CA_BUNDLE",
    "OWNER_UID",
    "UPLOADER_CHECKSUMS",
}
RESTRICTED_UID = 64535  # Deckhouse's pods run as this uid, whatever the image says


def the_pod(rendered: Rendered) -> Manifest:
    (pod,) = rendered.of_kind("Pod")
    return pod


def check_restricted(pod: Manifest) -> None:
    for each in pod["spec"]["containers"]:
        context = each["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == RESTRICTED_UID
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "/tmp" in {m["mountPath"] for m in each["volumeMounts"]}
    assert pod["spec"]["securityContext"]["fsGroup"] == RESTRICTED_UID
    assert pod["spec"]["restartPolicy"] == "OnFailure"


def check_dvcr_auth(rendered: Rendered, spec: Manifest, variable: str) -> Path:
    """The auth config variable names a file in a mounted Secret of dockerconfigjson type."""
    path = Path(env_of(spec)[variable]["value"])
    mount = next(m for m in spec["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    pod = the_pod(rendered)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    secret = rendered.one("Secret", volume["secret"]["secretName"])
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert path.name in secret.get("stringData", {}) or path.name in secret.get("data", {})
    return path


def test_uploader_pod_as_the_controller_makes_it() -> None:
    rendered = render("deckhouse/uploader")
    pod = the_pod(rendered)
    spec = container(pod["spec"], "d8v-dvcr-uploader")
    assert spec["command"] == ["/usr/local/bin/dvcr-uploader"]
    assert spec["args"] == ["-v=3"]
    assert ports_of(spec) == {"uploader": 8444, "healthz": 8080, "metrics": 8443}
    env = env_of(spec)
    assert set(env) <= UPLOADER_VARIABLES, set(env) - UPLOADER_VARIABLES
    assert {"OWNER_UID", "UPLOADER_DESTINATION_ENDPOINT", "DESTINATION_INSECURE_TLS"} <= set(env)
    owner_uid = env["OWNER_UID"]["value"]
    assert pod["metadata"]["name"].endswith(owner_uid)
    assert env["UPLOADER_DESTINATION_ENDPOINT"]["value"].endswith(
        f"/vi/default/some-image:{owner_uid}"
    )
    assert env["UPLOADER_CHECKSUMS"]["value"].startswith("sha256:")
    probe = spec["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz", "healthz")
    check_restricted(pod)
    check_dvcr_auth(rendered, spec, "UPLOADER_DESTINATION_AUTH_CONFIG")
    assert spec["image"].startswith("registry.example.com/dvcr-uploader:")


def test_uploader_service_ingress_and_policy_reach_the_pod() -> None:
    rendered = render("deckhouse/uploader")
    pod = the_pod(rendered)
    labels = pod["metadata"]["labels"]
    service = rendered.one("Service")
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("uploader", 80, 8444)
    ingress = rendered.one("Ingress")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["pathType"] == "Exact"
    assert path["path"].startswith("/upload/") and len(path["path"]) == len("/upload/") + 32
    assert path["backend"]["service"] == {
        "name": service["metadata"]["name"],
        "port": {"number": 80},
    }
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/rewrite-target"] == "/upload"
    assert annotations["virtualization.deckhouse.io/upload.path"] == path["path"]
    assert annotations["virtualization.deckhouse.io/upload.url"].endswith(
        rule["host"] + path["path"]
    )
    policy = rendered.one("NetworkPolicy")
    (expression,) = policy["spec"]["podSelector"]["matchExpressions"]
    assert expression["operator"] == "In" and labels[expression["key"]] in expression["values"]
    assert policy["spec"]["policyTypes"] == ["Egress"]


def test_importer_pod_as_the_controller_makes_it() -> None:
    rendered = render("deckhouse/importer")
    pod = the_pod(rendered)
    spec = container(pod["spec"], "d8v-dvcr-importer")
    assert spec["command"] == ["/usr/local/bin/dvcr-importer"]
    assert spec["args"] == ["-v=3"]
    assert ports_of(spec) == {"metrics": 8443}
    env = env_of(spec)
    for name in (
        "IMPORTER_SOURCE",
        "IMPORTER_ENDPOINT",
        "IMPORTER_DESTINATION_ENDPOINT",
        "OWNER_UID",
    ):
        assert env[name]["value"], name
    assert env["INSECURE_TLS"]["value"] == "false"
    assert pod["metadata"]["name"] == f"d8v-vi-importer-{env['OWNER_UID']['value']}"
    check_restricted(pod)
    check_dvcr_auth(rendered, spec, "IMPORTER_DESTINATION_AUTH_CONFIG")
    policy = rendered.one("NetworkPolicy")
    (expression,) = policy["spec"]["podSelector"]["matchExpressions"]
    assert pod["metadata"]["labels"][expression["key"]] in expression["values"]


def test_our_importer_runs_as_the_importer_pod_runs_it(
    nginx: Nginx, registry: Registry, tmp_path: Path
) -> None:
    """The pod's arguments and every variable of its environment, empty ones included; only the
    source, the DVCR and the files a pod would have are put on this machine."""
    rendered = render("deckhouse/importer")
    spec = container(the_pod(rendered)["spec"], "d8v-dvcr-importer")
    env = {name: var["value"] for name, var in env_of(spec).items()}
    sha256, _ = write_disk_image(nginx.files / "disk.img", 8 * MiB, seed=7)
    repo = f"vi/default/ubuntu-2204:{env['OWNER_UID']}"
    auth = tmp_path / "dvcr-auth" / ".dockerconfigjson"
    auth.parent.mkdir()
    secret = rendered.one("Secret")
    auth.write_text(secret["stringData"][".dockerconfigjson"])
    env |= {
        "IMPORTER_ENDPOINT": f"{nginx.url}/disk.img",
        "IMPORTER_DESTINATION_ENDPOINT": f"{registry.host}/{repo}",
        "IMPORTER_DESTINATION_AUTH_CONFIG": str(auth),
        "IMPORTER_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    term = tmp_path / "termination-log"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "importer.cli",
            *spec["args"],
            "--termination-message-path",
            str(term),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    message = json.loads(term.read_text())
    assert message["checksum"]["sha256"] == sha256
    name, tag = repo.split(":")
    request = urllib.request.Request(
        f"{registry.url}/v2/{name}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        manifest = json.loads(answer.read())
    assert len(manifest["layers"]) == 1
