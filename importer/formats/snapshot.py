"""Snapshots of a decoder between two `feed` calls, to continue it in another process.

`snapshot_decoder` saves everything an `ImageDecoder` holds at a point between two feeds:
the probe and stage chain, the converter with its tables, claims and spill. A new process
gives the bytes to `restore_decoder` with a target reopened on the same data, feeds the
rest of the stream from the same input offset and gets exactly the disk an uninterrupted
run makes. The decoder itself goes on as before: it may be fed on after a snapshot.

The decoder is pickled; the target, the limits and spill files are left out and put back
on restore: the target and limits are those given to `restore_decoder`, a spill file is
reopened by the name recorded in the state. Taking a snapshot makes the spill files
durable and keeps them: from then on `close()` leaves them in place (bytes once written
to a spill file are never rewritten, so the decoder may keep appending), and whoever
stores the snapshot deletes them with it (`spill_files`).

Not every stream can be saved: the decompressor objects of zlib, lzma, bz2 and zstandard
cannot be serialized, so while an unwrap stage holds one (a gzip or bzip2 member is under
way; an xz stream decoded the usual way; a zstd stream, always) `snapshot_decoder` returns
None. An xz stream of blocks that give their sizes (`xz -T0`) is decoded without one and
can be saved anywhere (importer.formats.xz), and so can a tar archive without
compression.

The state starts with a magic and a format version and ends with a sha256 of the rest;
it also records a fingerprint of this package's source, since pickled converter state
is only meaningful to the same code. A state of another version or other code, or a
corrupt or foreign one, is refused with ValueError. Unpickling only makes objects of this
package and a few plain types, but the state must still come from trusted storage (the
server's own data directory), never from a client.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import itertools
import json
import lzma
import pickle
import re
import struct
import types
import zlib
from pathlib import Path
from typing import Any, Final

import zstandard

from importer.formats.base import Limits, RawTarget
from importer.formats.decoder import ImageDecoder
from importer.formats.spillfile import SpillFile

MAGIC: Final = b"IMGDEC\r\n"
VERSION: Final = 1
_HEAD = struct.Struct(">8sHI")  # magic, version, length of the metadata (JSON)
_DIGEST = 32  # sha256 of everything before it

_DECOMPRESSORS: Final = (
    type(zlib.decompressobj()),
    lzma.LZMADecompressor,
    bz2.BZ2Decompressor,
    zstandard.ZstdDecompressor,
    type(zstandard.ZstdDecompressor().decompressobj()),
)

# What a state may name besides the classes and functions of this package.
_PLAIN: Final = {
    ("array", "_array_reconstructor"),
    ("array", "array"),
    ("builtins", "bytearray"),
    ("builtins", "frozenset"),
    ("builtins", "iter"),
    ("builtins", "set"),
    ("functools", "partial"),
    ("itertools", "count"),
    ("uuid", "SafeUUID"),
    ("uuid", "UUID"),
}
_PACKAGE: Final = __name__.rpartition(".")[0] + "."
# Methods a state may name: converters' private callbacks.
_CALLBACK: Final = re.compile(r"_[a-z][a-z0-9_]*")


class _NotSnapshottable(Exception):
    pass


def snapshot_decoder(decoder: ImageDecoder, extra: dict[str, Any] | None = None) -> bytes | None:
    """The decoder's state, to go on in another process from the same input offset; None
    when an unwrap stage holds a decompressor (zlib, lzma, bz2, zstd), which cannot be
    serialized. Call it between two `feed` calls, never during one, on a settled decoder
    (`ImageDecoder.settle`, which may still write to the target: before anything of the
    target is read for `extra`). Its spill files are fdatasynced (and their directory
    entries fsynced) before it returns; the target is not: the caller syncs the target's
    data before storing the state. `extra` (JSON-able) is stored along, for
    `state_metadata`."""
    out = io.BytesIO()
    pickler = _Pickler(out, decoder.target)
    try:
        pickler.dump(decoder)
    except _NotSnapshottable:
        return None
    files = []
    for spill in pickler.spills.values():
        kept = spill.persist()
        if kept is not None:
            files.append({"path": kept[0], "size": kept[1]})
    meta = json.dumps(
        {"code": code_fingerprint(), "spill_files": files, "extra": extra or {}},
        separators=(",", ":"),
    ).encode()
    # Joined once: a state may hold a part of a compressed block, some MiB.
    parts: list[bytes | memoryview] = [_HEAD.pack(MAGIC, VERSION, len(meta)), meta, out.getbuffer()]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return b"".join([*parts, digest.digest()])


def restore_decoder(state: bytes, target: RawTarget, limits: Limits) -> ImageDecoder:
    """The decoder saved in `state`, writing to `target` (reopened on the data the saved
    one wrote, see `FileClaimTarget.reopen`), ready for the bytes after the saved point.

    `limits` replaces the decoder's limits, and new spill files go to its `spill_dir`;
    values a converter copied from the limits when it started stay as saved. Raises
    ValueError for a state of another format version or code, a corrupt or foreign one,
    or one whose spill files are gone."""
    _meta, payload = _parse(state)
    unpickler = _Unpickler(io.BytesIO(payload), target, limits)
    try:
        decoder = unpickler.load()
    except ValueError:
        unpickler.release()
        raise
    except Exception as exc:
        unpickler.release()
        raise ValueError(f"the decoder state cannot be restored: {exc}") from exc
    if not isinstance(decoder, ImageDecoder):
        unpickler.release()
        raise ValueError("the state does not hold a decoder")
    return decoder


def state_metadata(state: bytes) -> dict[str, Any]:
    """What the state records besides the decoder: `spill_files` ([{"path", "size"}])
    and `extra` (as given to `snapshot_decoder`). Raises ValueError like restore."""
    return _parse(state)[0]


def spill_files(state: bytes) -> list[str]:
    """The spill files a state needs. They are deleted by neither decoder: delete them
    once the state is no longer kept (the transfer ended, or a newer state replaced it;
    then only those the newer one does not name)."""
    return [entry["path"] for entry in state_metadata(state)["spill_files"]]


def code_fingerprint() -> str:
    """A digest of the source of this package as it was imported: states are only valid
    for the same code."""
    return _FINGERPRINT


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


_FINGERPRINT: Final = _fingerprint()


def _parse(state: bytes) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(state)
    if len(view) < _HEAD.size + _DIGEST or view[:8].tobytes() != MAGIC:
        raise ValueError("this is not a decoder state")
    _magic, version, meta_length = _HEAD.unpack_from(view)
    if version != VERSION:
        raise ValueError(f"the decoder state has format version {version}, not {VERSION}")
    body = view[:-_DIGEST]
    if hashlib.sha256(body).digest() != view[-_DIGEST:] or _HEAD.size + meta_length > len(body):
        raise ValueError("the decoder state is corrupt")
    try:
        meta = json.loads(bytes(body[_HEAD.size : _HEAD.size + meta_length]))
    except ValueError as exc:
        raise ValueError("the decoder state is corrupt") from exc
    if not isinstance(meta, dict):
        raise ValueError("the decoder state is corrupt")
    if meta.get("code") != code_fingerprint():
        raise ValueError("the decoder state was saved by another version of the converters")
    return meta, body[_HEAD.size + meta_length :]


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, target: RawTarget) -> None:
        super().__init__(file, protocol=5)
        self.target = target
        self.spills: dict[int, SpillFile] = {}

    def persistent_id(self, obj: Any) -> Any:
        if obj is self.target:
            return ("target",)
        if isinstance(obj, Limits):
            return ("limits",)
        if isinstance(obj, SpillFile):
            self.spills[id(obj)] = obj
            return ("spill", obj.prefix, obj.path, obj.end)
        return None

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _DECOMPRESSORS:
            raise _NotSnapshottable
        if kind is types.MethodType:
            return _bound_method, (obj.__self__, obj.__func__.__name__)
        if kind is itertools.count:
            # count(n) -> n; pickling the object itself is deprecated since Python 3.12
            return itertools.count, (int(repr(obj)[6:-1]),)
        if kind is memoryview:
            raise TypeError("a view of the caller's buffer is kept between two feeds")
        return NotImplemented


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, target: RawTarget, limits: Limits) -> None:
        super().__init__(file)
        self.target = target
        self.limits = limits
        self.spills: list[SpillFile] = []

    def persistent_load(self, pid: Any) -> Any:
        match pid:
            case ("target",):
                return self.target
            case ("limits",):
                return self.limits
            case ("spill", str(prefix), None, 0):
                return SpillFile(self.limits.spill_dir, prefix)
            case ("spill", str(prefix), str(path), int(end)):
                try:
                    spill = SpillFile.reopen(self.limits.spill_dir, prefix, path, end)
                except OSError as exc:
                    raise ValueError(f"the spill file {path} is gone: {exc.strerror}") from exc
                self.spills.append(spill)
                return spill
        raise pickle.UnpicklingError(f"unknown reference {pid!r}")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module.startswith(_PACKAGE) and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type | types.FunctionType) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"the state names {module}.{name}")

    def release(self) -> None:
        """Closes the spill files reopened so far (they stay in place)."""
        for spill in self.spills:
            spill.close()


def _bound_method(obj: Any, name: str) -> Any:
    """A converter's own callback (`self._on_header`), and nothing else."""
    kind = type(obj)
    if (
        not kind.__module__.startswith(_PACKAGE)
        or not _CALLBACK.fullmatch(name)
        or not callable(getattr(kind, name, None))
    ):
        raise pickle.UnpicklingError(f"the state names {kind.__name__}.{name}")
    return getattr(obj, name)
