"""How the client proves who it is and whom it trusts: the bearer token of the API and the
TLS settings of every request (kubectl's `--token`, `--certificate-authority`,
`--insecure-skip-tls-verify`)."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# RFC 6750's b64token, loosened to any visible ASCII: what an HTTP header can carry as is.
_TOKEN = re.compile(r"^[\x21-\x7e]+$")

HOW_TO_GIVE_A_TOKEN = (
    "give a token with --token, DVCR_TOKEN, or DVCR_TOKEN_FILE "
    "(the server's own: DVCR_TOKEN_FILE=DATA_DIR/admin.token)"
)


class CredentialsError(Exception):
    """A token or CA that cannot be used; the message never holds the token."""


@dataclass(frozen=True)
class Credentials:
    token: str | None = field(default=None, repr=False)
    token_source: str = ""  # where the token came from, to name it in messages
    ca_file: Path | None = None
    insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise CredentialsError(
                f"cannot use the certificate authority {self.ca_file}: {reason}"
            ) from None
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def resolve_credentials(
    token: str | None,
    ca_file: Path | None,
    insecure: bool,
    environ: Mapping[str, str] = os.environ,
) -> Credentials:
    """The token from `--token`, else `DVCR_TOKEN`, else the file `DVCR_TOKEN_FILE` names."""
    source = ""
    if token:
        source = "--token"
    elif environ.get("DVCR_TOKEN"):
        token, source = environ["DVCR_TOKEN"], "DVCR_TOKEN"
    elif environ.get("DVCR_TOKEN_FILE"):
        path = environ["DVCR_TOKEN_FILE"]
        source = f"DVCR_TOKEN_FILE={path}"
        try:
            token = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise CredentialsError(f"cannot read the token file {path}: {reason}") from None
        if not token:
            raise CredentialsError(f"the token file {path} is empty")
    if token is not None:
        token = token.strip()
        if not _TOKEN.match(token):
            raise CredentialsError(
                f"the token from {source} has characters a bearer token cannot have"
            )
    return Credentials(token or None, source, ca_file, insecure)


def describe_tls_error(error: BaseException) -> str | None:
    """What a TLS failure was, with how to put a certificate problem right; None for an
    error that is not TLS's."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"certificate verify failed: {error.verify_message or error.reason}; "
            "--certificate-authority FILE trusts the server's CA, "
            "--insecure-skip-tls-verify skips the check"
        )
    if isinstance(error, ssl.SSLError):
        return str(error.reason or error)
    return None
