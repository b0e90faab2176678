"""A token server for the registry's `auth.token` flow: checks basic credentials, grants
what is asked, and returns a JWT signed RS256 that distribution 2.8 accepts."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections import Counter
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from serverproc import free_port
from testcerts import KeyPair

SERVICE = "dvcr-tests-registry"
ISSUER = "dvcr-tests-token-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The registry finds the signing key by this `kid`: the SHA-256 of the DER
    SubjectPublicKeyInfo cut to 240 bits, base32, in 12 groups of 4 joined by ':'."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def parse_scope(scope: str) -> dict[str, Any]:
    """`repository:vi/ns/x:pull,push` -> an access claim (the name itself has no colon
    here; a registry host with a port never appears in a scope)."""
    kind, rest = scope.split(":", 1)
    name, _, actions = rest.rpartition(":")
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


class TokenServer:
    def __init__(
        self, signing: KeyPair, *, username: str, password: str, refresh_token: str
    ) -> None:
        assert isinstance(signing.key, rsa.RSAPrivateKey)
        self._key = signing.key
        self._kid = libtrust_key_id(signing.key.public_key())
        pair = f"{username}:{password}".encode()
        self._expected = "Basic " + base64.b64encode(pair).decode()
        self._refresh = refresh_token
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self.scopes_asked: Counter[str] = Counter()
        self.refused = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> TokenServer:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_post("/token", self._refresh_token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "")
        if not secrets.compare_digest(given.encode(), self._expected.encode()):
            self.refused += 1
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}, status=401
            )
        if request.query.get("service") != SERVICE:
            return web.json_response({"details": "unknown service"}, status=400)
        scopes = request.query.getall("scope", [])
        self.scopes_asked[" ".join(scopes)] += 1
        subject = base64.b64decode(given.split()[1]).decode().split(":")[0]
        token = self.sign(subject, [parse_scope(scope) for scope in scopes])
        return web.json_response({"token": token, "expires_in": 300})

    async def _refresh_token(self, request: web.Request) -> web.Response:
        """The OAuth2 form an identity token (dockerconfigjson `identitytoken`) goes to."""
        form = await request.post()
        given = str(form.get("refresh_token", ""))
        if form.get("grant_type") != "refresh_token" or not secrets.compare_digest(
            given.encode(), self._refresh.encode()
        ):
            self.refused += 1
            return web.json_response({"error": "invalid_grant"}, status=401)
        scopes = str(form.get("scope", "")).split()
        self.scopes_asked[" ".join(scopes)] += 1
        token = self.sign("refresh-user", [parse_scope(scope) for scope in scopes])
        return web.json_response({"access_token": token, "expires_in": 300})

    def sign(self, subject: str, access: list[dict[str, Any]], lifetime: int = 300) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self._kid}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = ".".join(_b64url(json.dumps(part).encode()) for part in (header, claims))
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"
