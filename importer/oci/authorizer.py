"""What goes into the Authorization header of a registry request.

Nothing is sent until the registry asks (a 401): then either basic credentials, or a
bearer token from the challenge's realm, fetched per scope and kept until it expires.
Once a registry has asked, later requests carry the answer up front, which is what lets
a streamed (not replayable) request go through on the first try.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from multidict import MultiDict

from importer.oci.auth import Credentials
from importer.oci.challenge import Challenge
from importer.oci.errors import RegistryError, error_from_answer, error_from_exception

DEFAULT_TOKEN_LIFETIME = 60.0
_CLIENT_ID = "dvcr-uploader"


def pull_scope(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull",)


def push_scope(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull,push",)


def delete_scope(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull,delete",)


CATALOG_SCOPE = ("registry:catalog:*",)


@dataclass
class _Token:
    value: str
    expires_at: float

    @property
    def fresh(self) -> bool:
        return time.monotonic() < self.expires_at


class Authorizer:
    def __init__(
        self,
        credentials: Credentials | None,
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self._credentials = credentials
        self._session = session
        self._basic = False  # the registry asked for basic auth
        self._bearer: Challenge | None = None  # the registry's last bearer challenge
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.tokens_fetched = 0

    async def header(self, scope: Sequence[str], what: str) -> str | None:
        """The Authorization header to send up front, if the registry is known to want one."""
        if self._basic and self._credentials and self._credentials.basic_header:
            return self._credentials.basic_header
        if self._bearer is not None:
            return f"Bearer {await self._token(self._bearer, scope, scope, what)}"
        return None

    async def answer(
        self, challenges: Sequence[Challenge], scope: Sequence[str], sent: str | None, what: str
    ) -> str | None:
        """The header to retry a request with after a 401, or None when retrying is futile."""
        for challenge in challenges:
            if challenge.scheme == "bearer" and challenge.realm:
                self._bearer = challenge
                refused = sent.removeprefix("Bearer ") if sent else None
                wanted = _union(scope, challenge.scopes)
                token = await self._token(challenge, scope, wanted, what, refused=refused)
                return f"Bearer {token}"
        for challenge in challenges:
            if challenge.scheme == "basic" and self._credentials:
                basic = self._credentials.basic_header
                if basic is None or sent == basic:
                    return None  # the registry refused these very credentials
                self._basic = True
                return basic
        return None

    async def _token(
        self,
        challenge: Challenge,
        key: Sequence[str],
        scopes: Sequence[str],
        what: str,
        *,
        refused: str | None = None,
    ) -> str:
        """The token cached for `key` unless stale or `refused`; else a new one for `scopes`.
        Requests that meet a 401 together wait for one fetch and share its token."""
        cache_key = " ".join(sorted(key))
        lock = self._locks.setdefault(cache_key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(cache_key)
            if cached and cached.fresh and cached.value != refused:
                return cached.value
            token = await self._fetch_token(challenge, scopes, what)
            self._tokens[cache_key] = token
            return token.value

    async def _fetch_token(self, challenge: Challenge, scopes: Sequence[str], what: str) -> _Token:
        realm = challenge.realm
        what = f"{what}: getting a token from {realm}"
        credentials = self._credentials
        try:
            if credentials and credentials.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": credentials.identity_token,
                    "service": challenge.service,
                    "scope": " ".join(scopes),
                    "client_id": _CLIENT_ID,
                }
                request = self._session().post(realm, data=form)
            else:
                query: MultiDict[str] = MultiDict()
                if challenge.service:
                    query.add("service", challenge.service)
                for scope in scopes:
                    query.add("scope", scope)
                basic = credentials.basic_header if credentials else None
                headers = {"Authorization": basic} if basic else {}
                request = self._session().get(realm, params=query, headers=headers)
            async with request as response:
                body = await response.read()
                if response.status != 200:
                    raise error_from_answer(what, response.status, response.reason, body)
                document = await response.json(content_type=None)
        except RegistryError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise error_from_exception(what, realm, exc) from None
        except ValueError:
            raise RegistryError(f"{what}: the answer is not JSON") from None
        value = (
            document.get("token") or document.get("access_token")
            if isinstance(document, dict)
            else None
        )
        if not isinstance(value, str) or not value:
            raise RegistryError(f"{what}: the answer carries no token")
        lifetime = document.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        self.tokens_fetched += 1
        # Renew a little early so a token does not expire between sending and checking.
        return _Token(value, time.monotonic() + lifetime * 0.9)


def _union(first: Iterable[str], second: Iterable[str]) -> tuple[str, ...]:
    """Both sets of scopes, one per resource with its actions merged: a registry's challenge
    may name the same actions in another order (`push,pull`), which is the same scope."""
    merged: dict[str, list[str]] = {}
    for scope in [*first, *second]:
        resource, _, actions = scope.rpartition(":")
        known = merged.setdefault(resource or scope, [])
        for action in actions.split(",") if resource else ():
            if action and action not in known:
                known.append(action)
    return tuple(f"{res}:{','.join(acts)}" if acts else res for res, acts in merged.items())
