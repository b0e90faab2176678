"""The standalone server's manifests, as each overlay renders them: what a user relies on."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from deploymanifests import (
    SERVER_OVERLAYS,
    Manifest,
    Rendered,
    container,
    env_of,
    flags_of,
    ports_of,
    render,
)

from uploader.server.access import load_token_file

SERVER_RENDERINGS = ("server/base", *SERVER_OVERLAYS)
LARGE_UPLOAD_ANNOTATIONS = {
    "nginx.ingress.kubernetes.io/proxy-body-size": "0",
    "nginx.ingress.kubernetes.io/proxy-request-buffering": "off",
    "nginx.ingress.kubernetes.io/proxy-buffering": "off",
}
READ_TIMEOUT = "nginx.ingress.kubernetes.io/proxy-read-timeout"


@pytest.fixture(params=SERVER_RENDERINGS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render(request.param)


def pod_spec(rendered: Rendered) -> Manifest:
    spec: Manifest = rendered.one("StatefulSet")["spec"]["template"]["spec"]
    return spec


def server(rendered: Rendered) -> Manifest:
    return container(pod_spec(rendered), "server")


def server_flags(rendered: Rendered) -> dict[str, str]:
    return flags_of(server(rendered)["args"])


def port_of_flag(rendered: Rendered, flag: str) -> int:
    return int(server_flags(rendered)[flag].rsplit(":", 1)[1])


def api_service(rendered: Rendered) -> Manifest:
    return rendered.one("Service", "dvcr-uploader-api")


def upload_service(rendered: Rendered) -> Manifest:
    return rendered.one("Service", "dvcr-uploader")


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_one_replica_with_a_volume_for_the_data_dir(rendered: Rendered) -> None:
    statefulset = rendered.one("StatefulSet")
    assert statefulset["spec"]["replicas"] == 1
    data_dir = server_flags(rendered)["data-dir"]
    mounts = {m["mountPath"]: m["name"] for m in server(rendered)["volumeMounts"]}
    claims = [t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]]
    assert mounts[data_dir] in claims


def test_args_are_a_serve_command(rendered: Rendered) -> None:
    args = server(rendered)["args"]
    assert args[0] == "serve"
    assert "command" not in server(rendered), "the image's entrypoint is dvcr-uploader"
    flags = server_flags(rendered)
    assert flags["listen"].startswith("0.0.0.0:")
    assert flags["api-listen"].startswith("0.0.0.0:")
    assert len({flags["listen"], flags["api-listen"], flags["metrics-listen"]}) == 3


def test_restricted_security_context(rendered: Rendered) -> None:
    spec = pod_spec(rendered)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for each in spec["containers"] + spec.get("initContainers", []):
        context = each["securityContext"]
        assert context["runAsNonRoot"] is True, each["name"]
        assert context["readOnlyRootFilesystem"] is True, each["name"]
        assert context["allowPrivilegeEscalation"] is False, each["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, each["name"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, each["name"]
    # A read-only root: /tmp must be a volume of its own.
    assert "/tmp" in {m["mountPath"] for m in server(rendered)["volumeMounts"]}


def test_probes_ask_healthz_on_the_upload_listener(rendered: Rendered) -> None:
    ports = ports_of(server(rendered))
    upload_port = port_of_flag(rendered, "listen")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = server(rendered)[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        port = get["port"]
        assert (ports[port] if isinstance(port, str) else port) == upload_port, probe


def test_container_ports_are_the_listeners(rendered: Rendered) -> None:
    ports = ports_of(server(rendered))
    assert ports["upload"] == port_of_flag(rendered, "listen")
    assert ports["api"] == port_of_flag(rendered, "api-listen")
    assert ports["metrics"] == port_of_flag(rendered, "metrics-listen")


def test_resources_are_set(rendered: Rendered) -> None:
    resources = server(rendered)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_token_secret_is_mounted_and_passed(rendered: Rendered) -> None:
    token_file = server_flags(rendered)["api-token-file"]
    mount = next(
        m for m in server(rendered)["volumeMounts"] if token_file.startswith(m["mountPath"] + "/")
    )
    assert mount.get("readOnly") is True
    volume = next(v for v in pod_spec(rendered)["volumes"] if v["name"] == mount["name"])
    secret = rendered.one("Secret", volume["secret"]["secretName"])
    key = token_file[len(mount["mountPath"]) + 1 :]
    assert key in secret["data"], f"the Secret has no key {key}"


def test_token_file_is_one_the_server_loads(rendered: Rendered, tmp_path: Path) -> None:
    token_file = server_flags(rendered)["api-token-file"]
    volume_name = next(
        m["name"]
        for m in server(rendered)["volumeMounts"]
        if token_file.startswith(m["mountPath"] + "/")
    )
    volume = next(v for v in pod_spec(rendered)["volumes"] if v["name"] == volume_name)
    secret = rendered.one("Secret", volume["secret"]["secretName"])
    (data,) = secret["data"].values()
    path = tmp_path / "api-tokens.yaml"
    path.write_bytes(base64.b64decode(data))
    tokens = load_token_file(path)
    assert tokens, "no users in the token file"
    entries = yaml.safe_load(path.read_text())["tokens"]
    assert all("token" not in entry for entry in entries), "a plain token in version control"


def test_api_service_is_internal_and_not_in_the_ingress(rendered: Rendered) -> None:
    api = api_service(rendered)
    assert api["spec"]["type"] == "ClusterIP"
    ports = ports_of(server(rendered))
    targets = {p["targetPort"] for p in api["spec"]["ports"]}
    assert ports["api"] in {ports.get(t, t) for t in targets}
    backends = {
        path["backend"]["service"]["name"]
        for ingress in rendered.of_kind("Ingress")
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert api["metadata"]["name"] not in backends
    assert all(
        s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in rendered.of_kind("Service")
    )


def test_ingress_routes_only_the_upload_port(rendered: Rendered) -> None:
    ingress = rendered.one("Ingress")
    service = upload_service(rendered)
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    container_ports = ports_of(server(rendered))
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths
    for path in paths:
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        port = service_ports[backend["port"]["name"]]
        target = port["targetPort"]
        assert container_ports.get(target, target) == port_of_flag(rendered, "listen")
        assert path["path"].startswith(("/upload/", "/v1beta1/upload", "/v1alpha1/upload"))
    assert {p["path"] for p in paths} >= {"/upload/", "/v1beta1/upload", "/v1alpha1/upload"}
    assert "/" not in {p["path"] for p in paths}


def test_ingress_has_the_annotations_large_uploads_need(rendered: Rendered) -> None:
    annotations = rendered.one("Ingress")["metadata"]["annotations"]
    for key, value in LARGE_UPLOAD_ANNOTATIONS.items():
        assert annotations.get(key) == value, key
    assert int(annotations[READ_TIMEOUT]) >= 600


def test_external_url_is_the_ingress_host(rendered: Rendered) -> None:
    env = env_of(server(rendered))
    assert server_flags(rendered)["external-url"] == "$(EXTERNAL_URL)"
    ref = env["EXTERNAL_URL"]["valueFrom"]["configMapKeyRef"]
    external = rendered.one("ConfigMap", ref["name"])["data"][ref["key"]]
    ingress = rendered.one("Ingress")
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    assert urlsplit(external).hostname in hosts
    if ingress["spec"].get("tls"):
        assert urlsplit(external).scheme == "https"
        assert urlsplit(external).hostname in ingress["spec"]["tls"][0]["hosts"]


def test_in_cluster_url_names_the_upload_service(rendered: Rendered) -> None:
    url = urlsplit(server_flags(rendered)["in-cluster-url"])
    service_name, namespace_var = url.netloc.split(".")[:2]
    assert service_name == upload_service(rendered)["metadata"]["name"]
    assert namespace_var == "$(POD_NAMESPACE)"
    field = env_of(server(rendered))["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.namespace"
    assert url.port == upload_service(rendered)["spec"]["ports"][0]["port"]


def test_network_policy_selects_the_server_pods(rendered: Rendered) -> None:
    policy = rendered.one("NetworkPolicy")
    labels = rendered.one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert labels_match(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    api_rules = [
        rule
        for rule in policy["spec"]["ingress"]
        if any(p["port"] == "api" for p in rule.get("ports", []))
    ]
    assert api_rules and all(rule.get("from") for rule in api_rules), "the API open to all"
    link_local = [
        block["ipBlock"]
        for rule in policy["spec"]["egress"]
        for block in rule.get("to", [])
        if "ipBlock" in block
    ]
    assert all("169.254.0.0/16" in b["except"] for b in link_local if b["cidr"] == "0.0.0.0/0")


def test_services_select_the_server_pods(rendered: Rendered) -> None:
    labels = rendered.one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    for service in rendered.of_kind("Service"):
        assert labels_match(service["spec"]["selector"], labels), service["metadata"]["name"]


def test_service_monitor_scrapes_metrics_with_a_token(rendered: Rendered) -> None:
    monitor = rendered.one("ServiceMonitor")
    api = api_service(rendered)
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], api["metadata"]["labels"])
    assert not labels_match(
        monitor["spec"]["selector"]["matchLabels"], upload_service(rendered)["metadata"]["labels"]
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    port = next(p for p in api["spec"]["ports"] if p["name"] == endpoint["port"])
    assert ports_of(server(rendered))[port["targetPort"]] == port_of_flag(
        rendered, "metrics-listen"
    )
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["type"] == "Bearer"


def test_overlays_set_the_image() -> None:
    for overlay in SERVER_OVERLAYS:
        image = server(render(overlay))["image"]
        assert image.startswith("registry.example.com/dvcr-uploader:"), overlay


def test_registry_overlay_gives_the_dvcr_and_its_credentials() -> None:
    rendered = render("server/overlays/registry-dvcr")
    flags = server_flags(rendered)
    assert flags["dvcr"]
    auth = flags["dvcr-auth-config"]
    mounts = {m["mountPath"]: m["name"] for m in server(rendered)["volumeMounts"]}
    mount_path = auth.rsplit("/", 1)[0]
    assert mount_path in mounts
    volume = next(v for v in pod_spec(rendered)["volumes"] if v["name"] == mounts[mount_path])
    assert volume["secret"]["secretName"] == "dvcr-uploader-dvcr-auth"
    assert "dvcr" not in server_flags(render("server/overlays/embedded-dvcr"))


def test_namespace_enforces_the_restricted_profile() -> None:
    for overlay in SERVER_OVERLAYS:
        rendered = render(overlay)
        (namespace,) = rendered.of_kind("Namespace")
        labels = namespace["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        name = namespace["metadata"]["name"]
        others = [d for d in rendered.documents if d["kind"] != "Namespace"]
        assert all(d["metadata"]["namespace"] == name for d in others), overlay


def test_rendered_yaml_round_trips() -> None:
    """What a user pipes to `kubectl apply -f -` parses back the same."""
    rendered = render("server/overlays/registry-dvcr")
    text = yaml.safe_dump_all(rendered.documents)
    assert tuple(yaml.safe_load_all(text)) == rendered.documents
