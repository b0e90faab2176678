"""Label selectors as `?labelSelector=` takes them, in kubectl's syntax.

Requirements are separated by commas and must all hold: `key` (the label is there),
`!key` (it is not), `key=value` or `key==value`, `key!=value` (also true when the label is
missing), `key in (a,b)` and `key notin (a,b)` (notin is also true when it is missing).
Keys and values follow the rules of labels themselves (uploader/resources.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from uploader.errors import BadRequest
from uploader.quoting import cut
from uploader.resources import label_key_problem, label_value_problem

_SET = re.compile(r"^(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_COMPARE = re.compile(r"^(?P<key>[^\s!=(),]+)\s*(?P<op>==|!=|=)\s*(?P<value>[^\s!=(),]*)$")
_EXISTS = re.compile(r"^(?P<not>!?)\s*(?P<key>[^\s!=(),]+)$")

Labels = Mapping[str, str]


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Callable[[Labels], bool], ...] = ()

    def matches(self, labels: Labels | None) -> bool:
        have = labels or {}
        return all(requirement(have) for requirement in self.requirements)


EVERYTHING = LabelSelector()


def parse_label_selector(text: str | None) -> LabelSelector:
    """The selector `text` writes; BadRequest naming the requirement that is wrong."""
    if text is None or not text.strip():
        return EVERYTHING
    return LabelSelector(tuple(_requirement(text, term) for term in _terms(text)))


def _terms(text: str) -> list[str]:
    """The requirements: split at commas outside parentheses."""
    terms: list[str] = []
    depth, start = 0, 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise _bad(text, "a ')' without its '('")
        elif char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    if depth:
        raise _bad(text, "a '(' without its ')'")
    terms.append(text[start:])
    return [term.strip() for term in terms]


def _requirement(text: str, term: str) -> Callable[[Labels], bool]:
    if match := _SET.match(term):
        key = _key(text, match["key"])
        values = frozenset(_value(text, v.strip()) for v in match["values"].split(","))
        if match["op"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _COMPARE.match(term):
        key, value = _key(text, match["key"]), _value(text, match["value"])
        if match["op"] == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _EXISTS.match(term):
        key = _key(text, match["key"])
        if match["not"]:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    raise _bad(
        text,
        f'cannot parse the requirement "{cut(term)}": write key, !key, key=value, '
        "key!=value, key in (a,b) or key notin (a,b)",
    )


def _key(text: str, key: str) -> str:
    problem = label_key_problem(key)
    if problem is not None:
        raise _bad(text, f'the key "{cut(key)}": {problem}')
    return key


def _value(text: str, value: str) -> str:
    problem = label_value_problem(value)
    if problem is not None:
        raise _bad(text, f'the value "{cut(value)}": {problem}')
    return value


def _bad(text: str, why: str) -> BadRequest:
    return BadRequest(f'unable to parse the label selector "{cut(text)}": {why}')
