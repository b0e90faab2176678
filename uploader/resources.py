"""The VirtualImage and ClusterVirtualImage resources: kinds, validation, defaults.

Validation answers like the Kubernetes API server does: 422 with a message that names the
field (`spec.storage: Unsupported value: "Foo": supported values: ...`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from uploader.errors import Invalid

GROUP = "virtualization.deckhouse.io"
VERSION = "v1alpha2"
API_VERSION = f"{GROUP}/{VERSION}"

STORAGE_REGISTRY = "ContainerRegistry"
STORAGE_PVC = "PersistentVolumeClaim"
SOURCE_TYPES = ("HTTP", "ContainerImage", "Upload", "ObjectRef")
SOURCE_FIELDS = {
    "HTTP": "http",
    "ContainerImage": "containerImage",
    "Upload": "upload",
    "ObjectRef": "objectRef",
}
OBJECT_REF_KINDS = ("VirtualImage", "ClusterVirtualImage", "VirtualDisk")
CHECKSUM_LENGTHS = {"md5": 32, "sha256": 64}

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


@dataclass(frozen=True)
class Kind:
    """One resource kind and where it lives in the API."""

    name: str
    plural: str
    short: str
    namespaced: bool

    @property
    def list_kind(self) -> str:
        return f"{self.name}List"

    @property
    def display(self) -> str:
        """How kubectl names it in messages: virtualimage.virtualization.deckhouse.io."""
        return f"{self.name.lower()}.{GROUP}"


VIRTUAL_IMAGE = Kind("VirtualImage", "virtualimages", "vi", namespaced=True)
CLUSTER_VIRTUAL_IMAGE = Kind("ClusterVirtualImage", "clustervirtualimages", "cvi", namespaced=False)
KINDS = {k.name: k for k in (VIRTUAL_IMAGE, CLUSTER_VIRTUAL_IMAGE)}


def kind_for_word(word: str) -> Kind | None:
    """`vi`, `virtualimage`, `virtualimages`, `virtualimage.virtualization.deckhouse.io`."""
    word = word.lower().removesuffix(f".{GROUP}")
    for kind in KINDS.values():
        if word in (kind.short, kind.plural, kind.name.lower()):
            return kind
    return None


def validate_name(name: Any, field: str = "metadata.name") -> str:
    if not isinstance(name, str) or not name:
        raise Invalid(f"{field}: Required value: name is required")
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        raise Invalid(
            f'{field}: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of '
            "lower case alphanumeric characters, '-' or '.', and must start and end with an "
            "alphanumeric character (e.g. 'example.com', regex used for validation is "
            f"'{_DNS1123_SUBDOMAIN.pattern[1:-1]}')"
        )
    return name


def validate_namespace(namespace: Any) -> str:
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS1123_LABEL.match(namespace):
        raise Invalid(
            f'metadata.namespace: Invalid value: "{namespace}": a lowercase RFC 1123 label must '
            "consist of lower case alphanumeric characters or '-', and must start and end with "
            "an alphanumeric character"
        )
    return namespace


def _require_mapping(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        raise Invalid(f"{field}: Required value")
    if not isinstance(value, dict):
        raise Invalid(f"{field}: Invalid value: must be an object")
    return value


def _reject_unknown(obj: dict[str, Any], allowed: tuple[str, ...], field: str) -> None:
    for key in obj:
        if key not in allowed:
            raise Invalid(
                f'{field}.{key}: Unsupported field: "{key}" is not declared in the schema'
            )


def _supported(value: Any, choices: tuple[str, ...], field: str) -> str:
    if value not in choices:
        listed = ", ".join(f'"{c}"' for c in choices)
        raise Invalid(f'{field}: Unsupported value: "{value}": supported values: {listed}')
    return value


def _validate_checksum(checksum: Any, field: str) -> None:
    checksum = _require_mapping(checksum, field)
    _reject_unknown(checksum, tuple(CHECKSUM_LENGTHS), field)
    for algorithm, value in checksum.items():
        length = CHECKSUM_LENGTHS[algorithm]
        if not isinstance(value, str) or len(value) != length or not _HEX.match(value):
            raise Invalid(
                f'{field}.{algorithm}: Invalid value: "{value}": must be {length} hex digits'
            )


def _validate_ca_bundle(value: Any, field: str) -> None:
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise Invalid(f"{field}: Invalid value: must be base64-encoded PEM") from None
    if b"-----BEGIN CERTIFICATE-----" not in decoded:
        raise Invalid(f"{field}: Invalid value: the decoded bundle holds no PEM certificate")


def _validate_source(source: dict[str, Any], kind: Kind) -> None:
    source_type = _supported(source.get("type"), SOURCE_TYPES, "spec.dataSource.type")
    _reject_unknown(source, ("type", *SOURCE_FIELDS.values()), "spec.dataSource")
    field_name = SOURCE_FIELDS[source_type]
    for other_type, other in SOURCE_FIELDS.items():
        if other != field_name and other in source:
            raise Invalid(
                f"spec.dataSource.{other}: Forbidden: may only be set when type is {other_type}"
            )
    field = f"spec.dataSource.{field_name}"
    if source_type == "Upload":
        upload = source.get("upload") or {}
        _require_mapping(upload, field)
        _reject_unknown(upload, ("checksum",), field)
        if "checksum" in upload:
            _validate_checksum(upload["checksum"], f"{field}.checksum")
    elif source_type == "HTTP":
        http = _require_mapping(source.get("http"), field)
        _reject_unknown(http, ("url", "caBundle", "checksum"), field)
        url = http.get("url")
        parsed = urlparse(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise Invalid(f'{field}.url: Invalid value: "{url}": must be an http or https URL')
        if "caBundle" in http:
            _validate_ca_bundle(http["caBundle"], f"{field}.caBundle")
        if "checksum" in http:
            _validate_checksum(http["checksum"], f"{field}.checksum")
    elif source_type == "ContainerImage":
        image = _require_mapping(source.get("containerImage"), field)
        _reject_unknown(image, ("image", "imagePullSecret", "caBundle"), field)
        if not isinstance(image.get("image"), str) or not image["image"]:
            raise Invalid(f"{field}.image: Required value")
        if "caBundle" in image:
            _validate_ca_bundle(image["caBundle"], f"{field}.caBundle")
        if "imagePullSecret" in image:
            secret = _require_mapping(image["imagePullSecret"], f"{field}.imagePullSecret")
            _reject_unknown(secret, ("name", "namespace"), f"{field}.imagePullSecret")
            validate_name(secret.get("name"), f"{field}.imagePullSecret.name")
            if "namespace" in secret:
                validate_namespace(secret["namespace"])
    else:
        ref = _require_mapping(source.get("objectRef"), field)
        _reject_unknown(ref, ("kind", "name", "namespace"), field)
        _supported(ref.get("kind"), OBJECT_REF_KINDS, f"{field}.kind")
        validate_name(ref.get("name"), f"{field}.name")
        if kind is CLUSTER_VIRTUAL_IMAGE and ref["kind"] != "ClusterVirtualImage":
            namespace = ref.get("namespace")
            if namespace is None:
                raise Invalid(f"{field}.namespace: Required value: for a {ref['kind']} source")
            validate_namespace(namespace)


def validate_manifest(doc: Any, kind: Kind, namespace: str | None) -> dict[str, Any]:
    """Checks a manifest posted to `kind`'s collection; returns its normalised form
    (apiVersion, kind, metadata.name/namespace/labels/annotations, spec with defaults)."""
    doc = _require_mapping(doc, "body")
    if doc.get("apiVersion") != API_VERSION:
        raise Invalid(
            f'apiVersion: Unsupported value: "{doc.get("apiVersion")}": supported values: '
            f'"{API_VERSION}"'
        )
    if doc.get("kind") != kind.name:
        raise Invalid(f'kind: Invalid value: "{doc.get("kind")}": this endpoint takes {kind.name}')
    metadata = _require_mapping(doc.get("metadata"), "metadata")
    name = validate_name(metadata.get("name"))
    meta: dict[str, Any] = {"name": name}
    if kind.namespaced:
        given = metadata.get("namespace")
        if given is not None and given != namespace:
            raise Invalid(
                f'metadata.namespace: Invalid value: "{given}": does not match the namespace '
                f'of the request "{namespace}"'
            )
        meta["namespace"] = validate_namespace(namespace)
    for key in ("labels", "annotations"):
        if key in metadata:
            value = _require_mapping(metadata[key], f"metadata.{key}")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise Invalid(f"metadata.{key}: Invalid value: keys and values must be strings")
            meta[key] = dict(value)

    spec = dict(_require_mapping(doc.get("spec"), "spec"))
    _reject_unknown(spec, ("storage", "persistentVolumeClaim", "dataSource"), "spec")
    spec.setdefault("storage", STORAGE_REGISTRY)
    _supported(spec["storage"], (STORAGE_REGISTRY, STORAGE_PVC), "spec.storage")
    if kind is CLUSTER_VIRTUAL_IMAGE and spec["storage"] != STORAGE_REGISTRY:
        raise Invalid(
            f'spec.storage: Unsupported value: "{spec["storage"]}": a ClusterVirtualImage is '
            f'stored in DVCR only: "{STORAGE_REGISTRY}"'
        )
    if "persistentVolumeClaim" in spec:
        pvc = _require_mapping(spec["persistentVolumeClaim"], "spec.persistentVolumeClaim")
        _reject_unknown(pvc, ("storageClassName",), "spec.persistentVolumeClaim")
    _validate_source(_require_mapping(spec.get("dataSource"), "spec.dataSource"), kind)
    return {"apiVersion": API_VERSION, "kind": kind.name, "metadata": meta, "spec": spec}
