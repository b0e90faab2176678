"""The upload listener's TLS, as Deckhouse's binary sets it up: a server certificate
(`TLS_CERT_FILE`, `TLS_KEY_FILE`), CDI's cipher list and minimum version (`TLS_CIPHERS`,
`TLS_MIN_VERSION`), and mTLS (`CLIENT_CA_FILE`: a client certificate signed by it is
required; `CLIENT_NAME`: and its CommonName must be this one).

Deckhouse's binary checks the CommonName in the handshake. Python's ssl module has no
hook there, so the check is made on the verified certificate before anything of a
request is answered or read (`check_client_name`): a client with another name gets 401
and its body is never taken.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web

from uploader.errors import Unauthorized
from uploader.pod.options import OptionsError, PodOptions

# CDI's TLS_CIPHERS holds Go's (IANA) names; OpenSSL knows the same suites by these.
_IANA_TO_OPENSSL = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
}
# TLS 1.3's suites are not configurable in Go either: named, they change nothing.
_TLS13_SUITES = frozenset(
    {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
)
# openshift/library-go's names, which CDI's TLS_MIN_VERSION takes.
_MIN_VERSIONS = {
    "VersionTLS10": ssl.TLSVersion.TLSv1,
    "VersionTLS11": ssl.TLSVersion.TLSv1_1,
    "VersionTLS12": ssl.TLSVersion.TLSv1_2,
    "VersionTLS13": ssl.TLSVersion.TLSv1_3,
}


def _openssl_ciphers(names: tuple[str, ...]) -> str:
    known = {c["name"] for c in ssl.create_default_context().get_ciphers()}
    chosen: list[str] = []
    for name in names:
        if name in _TLS13_SUITES:
            continue
        openssl_name = _IANA_TO_OPENSSL.get(name, name)
        if openssl_name not in _IANA_TO_OPENSSL.values() and openssl_name not in known:
            raise OptionsError(f"TLS_CIPHERS: {name[:80]!r} is not a TLS 1.2 cipher suite")
        chosen.append(openssl_name)
    return ":".join(chosen)


def server_context(options: PodOptions) -> ssl.SSLContext | None:
    """The upload listener's TLS context; None for plain HTTP (no server certificate)."""
    if options.cert_file is None or options.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(options.cert_file, options.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise OptionsError(
            f"TLS_CERT_FILE/TLS_KEY_FILE: cannot use {options.cert_file} and "
            f"{options.key_file}: {exc}"
        ) from None
    if options.min_tls_version:
        version = _MIN_VERSIONS.get(options.min_tls_version)
        if version is None:
            raise OptionsError(
                f"TLS_MIN_VERSION: {options.min_tls_version[:40]!r} is not one of "
                f"{', '.join(_MIN_VERSIONS)}"
            )
        context.minimum_version = version
    if options.ciphers:
        ciphers = _openssl_ciphers(options.ciphers)
        if ciphers:
            try:
                context.set_ciphers(ciphers)
            except ssl.SSLError:
                raise OptionsError(
                    "TLS_CIPHERS: none of the cipher suites can be used here"
                ) from None
    if options.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=options.client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise OptionsError(
                f"CLIENT_CA_FILE: no CA certificate in {options.client_ca_file}: {exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _common_names(certificate: dict[str, Any]) -> list[str]:
    return [
        str(value)
        for rdn in certificate.get("subject", ())
        for key, value in rdn
        if key == "commonName"
    ]


def check_client_name(request: web.Request, expected: str) -> None:
    """Refuses (401) a client whose verified certificate is not issued to `expected`."""
    if not expected:
        return
    transport = request.transport
    certificate = transport.get_extra_info("peercert") if transport is not None else None
    names = _common_names(certificate) if isinstance(certificate, dict) else []
    if expected not in names:
        shown = ", ".join(repr(n[:64]) for n in names) or "none"
        raise Unauthorized(
            f"the client certificate's CommonName ({shown}) is not the one allowed here"
        )
