"""What a command's arguments name, the way kubectl reads them: `vi a b`, `vi,cvi`,
`vi/a cvi/b`; and the namespace a manifest may be sent to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uploader.client.api_client import ClientError
from uploader.resources import Kind, kind_for_word


@dataclass(frozen=True)
class Target:
    kind: Kind
    name: str | None  # None: every image of the kind (that a selector selects)


def kind_of(word: str) -> Kind:
    kind = kind_for_word(word)
    if kind is None:
        raise ClientError(f'the server doesn\'t have a resource type "{word}"', reason="BadRequest")
    return kind


def parse_targets(words: list[str]) -> list[Target]:
    """`TYPE[,TYPE...] [NAME...]` or `TYPE/NAME...`, in the order given."""
    if not words:
        raise ClientError(
            "You must specify the type of resource to get. Use one of: vi (virtualimages), "
            "cvi (clustervirtualimages)"
        )
    if any("/" in word for word in words):
        targets = []
        for word in words:
            type_word, slash, name = word.partition("/")
            if not slash or not name or "/" in name:
                raise ClientError(
                    f"there is no need to specify a resource type as a separate argument when "
                    f'passing arguments in resource/name form (e.g. "vi/NAME"): "{word}"'
                )
            targets.append(Target(kind_of(type_word), name))
        return targets
    kinds = [kind_of(word) for word in words[0].split(",") if word]
    if not kinds:
        raise ClientError(f'the server doesn\'t have a resource type "{words[0]}"')
    names = words[1:]
    if names and len(kinds) > 1:
        return [Target(kind, name) for kind in kinds for name in names]
    if names:
        return [Target(kinds[0], name) for name in names]
    return [Target(kind, None) for kind in kinds]


def manifest_namespace(doc: dict[str, Any], namespace: str, given: bool) -> str:
    """The namespace a manifest goes to: its own, else `namespace`. As kubectl, one that
    differs from a namespace given on the command line is refused."""
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("namespace") in (None, ""):
        return namespace
    own = metadata["namespace"]
    if not isinstance(own, str):
        raise ClientError(f"metadata.namespace of {metadata.get('name')} is not a string")
    if given and own != namespace:
        raise ClientError(
            f'the namespace from the provided object "{own}" does not match the namespace '
            f"\"{namespace}\". You must pass '--namespace={own}' to perform this operation."
        )
    return own
