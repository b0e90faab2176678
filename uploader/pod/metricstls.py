"""The metrics listener's TLS: a throwaway self-signed certificate made at start, as
Deckhouse's binary does (CDI's `StartPrometheusEndpoint`). Deckhouse's controller scrapes
`https://POD_IP:8443/metrics` and skips the certificate check, so the certificate only has
to exist; it never leaves the process and nobody has to trust it.

Python's ssl module loads a key only from a file: the PEM files are written, mode 0600,
into the pod's private state directory, loaded, and removed at once.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

COMMON_NAME = "dvcr-uploader-metrics"
VALIDITY = datetime.timedelta(days=365)


class MetricsTlsError(Exception):
    """The certificate could not be made or loaded; the message says why."""


def _self_signed() -> tuple[bytes, bytes]:
    """A new key and a certificate for it, signed by itself, as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(COMMON_NAME), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def self_signed_context(directory: Path) -> ssl.SSLContext:
    """A server context with a new self-signed certificate; `directory` is private to the
    process and holds the PEM files only while they are loaded."""
    cert_pem, key_pem = _self_signed()
    cert_file, key_file = directory / "metrics-tls.crt", directory / "metrics-tls.key"
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        _write_private(key_file, key_pem)
        _write_private(cert_file, cert_pem)
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise MetricsTlsError(
            f"cannot make the metrics certificate in {directory}: {exc}"
        ) from None
    finally:
        for path in (cert_file, key_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return context
