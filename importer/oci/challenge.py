"""The `WWW-Authenticate` challenge of a registry's 401 answer."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9._~+/-]*)\s*")
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.params.get("scope", "").split())


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """Every challenge in the given header values, in order (a value may hold several)."""
    challenges = []
    for header in headers:
        position = 0
        while position < len(header):
            scheme_match = _SCHEME.match(header, position)
            if not scheme_match:
                break
            position = scheme_match.end()
            params: dict[str, str] = {}
            while param_match := _PARAM.match(header, position):
                if not param_match.group(0).strip():
                    break
                name, value = param_match.group(1).lower(), param_match.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params[name] = value
                position = param_match.end()
            challenges.append(Challenge(scheme_match.group(1).lower(), params))
            position = _skip_separator(header, position)
    return challenges


def _skip_separator(header: str, position: int) -> int:
    while position < len(header) and header[position] in ", \t":
        position += 1
    return position
