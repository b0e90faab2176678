"""The VirtualImage and ClusterVirtualImage resources: kinds, validation, defaults.

Validation answers like the Kubernetes API server does: 422 with a message that names the
field (`spec.storage: Unsupported value: "Foo": supported values: ...`), quoting at most
200 characters of what was sent.

Names are checked here, once, before any path or registry reference is made of them, and
limited so that every name made of them is valid:

- an image's name (and the name of an image or disk a source refers to) is an RFC 1123
  subdomain of at most 128 characters. It becomes the claim `vi-{name}`, a PVC name (253
  characters at most) and a directory (255 bytes); the DVCR repository `vi/{ns}/{name}`,
  at most 195 characters, which leaves 59 for the registry's host:port within the 255 an
  image name may have; and Deckhouse derives names like `vi-{name}-{uid}` (168 characters).
  Every RFC 1123 subdomain is also a valid repository path component.
- a namespace is an RFC 1123 label of at most 63 characters, as in Kubernetes.
- an imagePullSecret's name is a Kubernetes Secret's: an RFC 1123 subdomain of at most 253
  characters (the file `DATA_DIR/secrets/{ns}/{name}`).

A VirtualImage reaches only its own namespace: a source (objectRef, imagePullSecret) that
names another one is Forbidden. A ClusterVirtualImage names the namespace of a namespaced
source.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from importer.urlredact import redact_url
from uploader.errors import Invalid
from uploader.quoting import cut, quoted

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
MAX_NAME_LENGTH = 128
MAX_NAMESPACE_LENGTH = 63
MAX_SECRET_NAME_LENGTH = 253
DEFAULT_SECRET_NAMESPACE = "default"  # a ClusterVirtualImage's imagePullSecret without one

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
MAX_LABEL_LENGTH = 63
MAX_LABEL_PREFIX_LENGTH = 253


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


def ready_condition(status: dict[str, Any]) -> dict[str, Any] | None:
    """The Ready condition of an image's status, which carries its phase's reason."""
    return next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)


def kind_for_word(word: str) -> Kind | None:
    """`vi`, `virtualimage`, `virtualimages`, `virtualimage.virtualization.deckhouse.io`."""
    word = word.lower().removesuffix(f".{GROUP}")
    for kind in KINDS.values():
        if word in (kind.short, kind.plural, kind.name.lower()):
            return kind
    return None


def _string(value: Any, field: str) -> str:
    """A required string field."""
    if value is None or value == "":
        raise Invalid(f"{field}: Required value")
    if not isinstance(value, str):
        raise Invalid(f"{field}: Invalid value: {quoted(value)}: must be a string")
    return value


def _not_longer(value: str, limit: int, field: str) -> None:
    if len(value) > limit:
        raise Invalid(
            f"{field}: Invalid value: {quoted(value)}: must be no more than {limit} characters"
        )


def validate_name(
    name: Any, field: str = "metadata.name", max_length: int = MAX_NAME_LENGTH
) -> str:
    """An image's name, or the name of what a source refers to (see the module's limits)."""
    if name is None or name == "":
        raise Invalid(f"{field}: Required value: name is required")
    text = _string(name, field)
    _not_longer(text, max_length, field)
    if not _DNS1123_SUBDOMAIN.match(text):
        raise Invalid(
            f"{field}: Invalid value: {quoted(text)}: a lowercase RFC 1123 subdomain must "
            "consist of lower case alphanumeric characters, '-' or '.', and must start and end "
            "with an alphanumeric character (e.g. 'example.com', regex used for validation is "
            f"'{_DNS1123_SUBDOMAIN.pattern[1:-1]}')"
        )
    return text


def validate_namespace(namespace: Any, field: str = "metadata.namespace") -> str:
    text = _string(namespace, field)
    _not_longer(text, MAX_NAMESPACE_LENGTH, field)
    if not _DNS1123_LABEL.match(text):
        raise Invalid(
            f"{field}: Invalid value: {quoted(text)}: a lowercase RFC 1123 label must "
            "consist of lower case alphanumeric characters or '-', and must start and end with "
            "an alphanumeric character"
        )
    return text


def label_key_problem(key: str) -> str | None:
    """What is wrong with a label or annotation key, as Kubernetes says it; None if nothing.
    A key is `[prefix/]name`: the prefix a DNS-1123 subdomain, the name at most 63
    characters of alphanumerics, '-', '_' and '.', beginning and ending alphanumeric."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return "prefix part must be non-empty"
        if len(prefix) > MAX_LABEL_PREFIX_LENGTH:
            return f"prefix part must be no more than {MAX_LABEL_PREFIX_LENGTH} characters"
        if not _DNS1123_SUBDOMAIN.match(prefix):
            return (
                "prefix part a lowercase RFC 1123 subdomain must consist of lower case "
                "alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character (e.g. 'example.com')"
            )
    if not name:
        return "name part must be non-empty"
    if len(name) > MAX_LABEL_LENGTH:
        return f"name part must be no more than {MAX_LABEL_LENGTH} characters"
    if not _LABEL_NAME.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character (e.g. 'MyName', or 'my.name', or "
            f"'123-abc', regex used for validation is '{_LABEL_NAME.pattern[1:-1]}')"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """What is wrong with a label value, as Kubernetes says it; None if nothing (an empty
    value is valid)."""
    if len(value) > MAX_LABEL_LENGTH:
        return f"must be no more than {MAX_LABEL_LENGTH} characters"
    if value and not _LABEL_NAME.match(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character (e.g. "
            "'MyValue', or 'my_value', or '12345', regex used for validation is "
            f"'{_LABEL_NAME.pattern[1:-1]}')"
        )
    return None


def source_namespace(
    kind: Kind, own: str | None, given: Any, field: str, default: str | None = None
) -> str:
    """The namespace of what a source refers to, `given` (None when not written) by an
    image of `kind` in namespace `own` (None for a ClusterVirtualImage).

    A VirtualImage reaches only its own namespace; a ClusterVirtualImage names one, or
    gets `default` when there is one.
    """
    if kind.namespaced:
        if given is None:
            return validate_namespace(own)
        checked = validate_namespace(given, field)
        if checked != own:
            raise Invalid(
                f"{field}: Forbidden: a {kind.name} may only refer to objects in its own "
                f"namespace {quoted(own)}, not {quoted(checked)}"
            )
        return checked
    if given is None:
        if default is None:
            raise Invalid(f"{field}: Required value: a {kind.name} must name the namespace")
        return default
    return validate_namespace(given, field)


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
                f"{field}.{cut(str(key))}: Unsupported field: {quoted(key)} is not declared in "
                "the schema"
            )


def _supported(value: Any, choices: tuple[str, ...], field: str) -> str:
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(f'"{c}"' for c in choices)
        raise Invalid(f"{field}: Unsupported value: {quoted(value)}: supported values: {listed}")
    return value


def _validate_checksum(checksum: Any, field: str) -> None:
    checksum = _require_mapping(checksum, field)
    _reject_unknown(checksum, tuple(CHECKSUM_LENGTHS), field)
    for algorithm, value in checksum.items():
        length = CHECKSUM_LENGTHS[algorithm]
        if not isinstance(value, str) or len(value) != length or not _HEX.match(value):
            raise Invalid(
                f"{field}.{algorithm}: Invalid value: {quoted(value)}: must be {length} hex digits"
            )


def _validate_ca_bundle(value: Any, field: str) -> None:
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise Invalid(f"{field}: Invalid value: must be base64-encoded PEM") from None
    if b"-----BEGIN CERTIFICATE-----" not in decoded:
        raise Invalid(f"{field}: Invalid value: the decoded bundle holds no PEM certificate")


def _validate_source(source: dict[str, Any], kind: Kind, namespace: str | None) -> None:
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
        upload = source.get("upload")
        upload = _require_mapping({} if upload is None else upload, field)
        _reject_unknown(upload, ("checksum",), field)
        if "checksum" in upload:
            _validate_checksum(upload["checksum"], f"{field}.checksum")
    elif source_type == "HTTP":
        http = _require_mapping(source.get("http"), field)
        _reject_unknown(http, ("url", "caBundle", "checksum"), field)
        url = _string(http.get("url"), f"{field}.url")
        try:
            parsed = urlparse(url)
            parsed.port  # noqa: B018 - a port out of range or not a number raises here
            valid = parsed.scheme in ("http", "https") and bool(parsed.hostname)
        except ValueError:  # a bad port, an unclosed [
            valid = False
        if not valid:
            raise Invalid(
                f"{field}.url: Invalid value: {quoted(redact_url(url))}: must be an http or "
                "https URL"
            )
        if "caBundle" in http:
            _validate_ca_bundle(http["caBundle"], f"{field}.caBundle")
        if "checksum" in http:
            _validate_checksum(http["checksum"], f"{field}.checksum")
    elif source_type == "ContainerImage":
        image = _require_mapping(source.get("containerImage"), field)
        _reject_unknown(image, ("image", "imagePullSecret", "caBundle"), field)
        _string(image.get("image"), f"{field}.image")
        if "caBundle" in image:
            _validate_ca_bundle(image["caBundle"], f"{field}.caBundle")
        if "imagePullSecret" in image:
            secret_field = f"{field}.imagePullSecret"
            secret = _require_mapping(image["imagePullSecret"], secret_field)
            _reject_unknown(secret, ("name", "namespace"), secret_field)
            validate_name(secret.get("name"), f"{secret_field}.name", MAX_SECRET_NAME_LENGTH)
            source_namespace(
                kind,
                namespace,
                secret.get("namespace"),
                f"{secret_field}.namespace",
                DEFAULT_SECRET_NAMESPACE,
            )
    else:
        ref = _require_mapping(source.get("objectRef"), field)
        _reject_unknown(ref, ("kind", "name", "namespace"), field)
        ref_kind = _supported(ref.get("kind"), OBJECT_REF_KINDS, f"{field}.kind")
        validate_name(ref.get("name"), f"{field}.name")
        if ref_kind == CLUSTER_VIRTUAL_IMAGE.name:
            if "namespace" in ref:
                raise Invalid(
                    f"{field}.namespace: Forbidden: a ClusterVirtualImage has no namespace"
                )
        else:
            source_namespace(kind, namespace, ref.get("namespace"), f"{field}.namespace")


def validate_manifest(doc: Any, kind: Kind, namespace: str | None) -> dict[str, Any]:
    """Checks a manifest posted to `kind`'s collection; returns its normalised form
    (apiVersion, kind, metadata.name/namespace/labels/annotations, spec with defaults)."""
    doc = _require_mapping(doc, "body")
    if doc.get("apiVersion") != API_VERSION:
        raise Invalid(
            f"apiVersion: Unsupported value: {quoted(doc.get('apiVersion'))}: supported values: "
            f'"{API_VERSION}"'
        )
    if doc.get("kind") != kind.name:
        raise Invalid(
            f"kind: Invalid value: {quoted(doc.get('kind'))}: this endpoint takes {kind.name}"
        )
    metadata = _require_mapping(doc.get("metadata"), "metadata")
    name = validate_name(metadata.get("name"))
    meta: dict[str, Any] = {"name": name}
    if kind.namespaced:
        meta["namespace"] = validate_namespace(namespace)
        given = metadata.get("namespace")
        if given is not None and given != namespace:
            raise Invalid(
                f"metadata.namespace: Invalid value: {quoted(given)}: does not match the "
                f"namespace of the request {quoted(namespace)}"
            )
    for key in ("labels", "annotations"):
        if key in metadata:
            value = _require_mapping(metadata[key], f"metadata.{key}")
            for item_key, item in value.items():
                if not isinstance(item_key, str) or not isinstance(item, str):
                    raise Invalid(
                        f"metadata.{key}.{cut(str(item_key))}: Invalid value: {quoted(item)}: "
                        "keys and values must be strings"
                    )
                problem = label_key_problem(item_key)
                if problem is None and key == "labels":
                    problem = label_value_problem(item)
                    shown_value = item
                else:
                    shown_value = item_key
                if problem is not None:
                    raise Invalid(
                        f"metadata.{key}: Invalid value: {quoted(shown_value)}: {problem}"
                    )
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
        if "storageClassName" in pvc:
            _string(pvc["storageClassName"], "spec.persistentVolumeClaim.storageClassName")
    source = _require_mapping(spec.get("dataSource"), "spec.dataSource")
    _validate_source(source, kind, meta.get("namespace"))
    return {"apiVersion": API_VERSION, "kind": kind.name, "metadata": meta, "spec": spec}
