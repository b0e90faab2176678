"""SHA-256 and MD5 whose running state can be saved as bytes and restored later.

An upload that resumes (after a dropped connection, or after the server restarted) must end
with exactly the checksums of an uninterrupted one, without reading back what it already
stored. hashlib objects cannot be serialized, so these hashers call libcrypto's low-level
`SHA256_Init/Update/Final` and `MD5_Init/Update/Final` through ctypes, and the context
struct is the state. It is the same OpenSSL code hashlib runs (SHA-NI/AVX2 where the CPU has
them), and `ctypes.CDLL` releases the GIL during each call, so lanes hash in parallel.

Saved state (version 1), every integer little-endian whatever the host:

    b"hs"  version:u8  algorithm:u8  bytes_hashed:u64  context

`context` is the OpenSSL struct field by field (SHA256_CTX: h[8], Nl, Nh, data[64 bytes],
num, md_len = 112 bytes; MD5_CTX: A, B, C, D, Nl, Nh, data[64 bytes], num = 92 bytes). A
restored state is checked for its length, header and counters (the bit count and the
partial block length must agree with `bytes_hashed`); anything else raises ValueError.

If libcrypto or its symbols are missing, importing works but constructing a hasher raises
HashStateUnavailable: nothing falls back to a hash that cannot be resumed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

Buffer = bytes | bytearray | memoryview

ALGORITHMS = ("sha256", "md5")

STATE_VERSION = 1
_MAGIC = b"hs"
_HEADER = struct.Struct("<2sBBQ")  # magic, version, algorithm tag, bytes hashed
_BIT_COUNT_MASK = (1 << 64) - 1  # Nl/Nh count bits modulo 2**64
_BLOCK = 64  # both algorithms work on 64-byte blocks


class HashStateUnavailable(RuntimeError):
    """libcrypto's low-level digest functions cannot be used on this system."""


class _Sha256Ctx(ctypes.Structure):
    _fields_ = (
        ("h", ctypes.c_uint32 * 8),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint8 * _BLOCK),
        ("num", ctypes.c_uint32),
        ("md_len", ctypes.c_uint32),
    )


class _Md5Ctx(ctypes.Structure):
    _fields_ = (
        ("A", ctypes.c_uint32),
        ("B", ctypes.c_uint32),
        ("C", ctypes.c_uint32),
        ("D", ctypes.c_uint32),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint8 * _BLOCK),
        ("num", ctypes.c_uint32),
    )


@dataclass(frozen=True)
class _Spec:
    name: str
    tag: int
    prefix: str  # symbol prefix in libcrypto
    ctx: type[ctypes.Structure]
    size: int  # sizeof the struct, as OpenSSL documents it on every platform
    native: struct.Struct  # the struct as it sits in memory
    portable: struct.Struct  # the same fields as saved
    words: int  # leading 32-bit words: chaining values, then Nl, Nh
    digest_size: int
    known: str  # digest of b"abc", checked once when the library loads

    def check(self, fields: tuple[int | bytes, ...], hashed: int) -> None:
        """Raises ValueError unless the unpacked context is one OpenSSL would have after
        hashing `hashed` bytes: bit count, partial block length, digest length."""
        nl, nh, _, num = fields[self.words - 2 : self.words + 2]
        if not (isinstance(nl, int) and isinstance(nh, int) and isinstance(num, int)):
            raise ValueError(f"{self.name} state: the counters are not numbers")
        if (nh << 32 | nl) != (hashed * 8) & _BIT_COUNT_MASK or num != hashed % _BLOCK:
            raise ValueError(f"{self.name} state: counters disagree with {hashed} bytes hashed")
        if self.name == "sha256" and fields[self.words + 2] != self.digest_size:
            raise ValueError("sha256 state: wrong digest length (not a SHA-256 context)")


_SPECS = {
    spec.name: spec
    for spec in (
        _Spec(
            name="sha256",
            tag=1,
            prefix="SHA256",
            ctx=_Sha256Ctx,
            size=112,
            native=struct.Struct("=10I64s2I"),
            portable=struct.Struct("<10I64s2I"),
            words=10,
            digest_size=32,
            known="ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ),
        _Spec(
            name="md5",
            tag=2,
            prefix="MD5",
            ctx=_Md5Ctx,
            size=92,
            native=struct.Struct("=6I64sI"),
            portable=struct.Struct("<6I64sI"),
            words=6,
            digest_size=16,
            known="900150983cd24fb0d6963f7d28e17f72",
        ),
    )
}
_BY_TAG = {spec.tag: spec for spec in _SPECS.values()}


@dataclass(frozen=True)
class _Functions:
    init: Callable[..., int]
    update: Callable[..., int]
    final: Callable[..., int]


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer, to reach the memory of a read-only buffer without copying."""

    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None
_PYBUF_SIMPLE = 0  # contiguous bytes; the exporter refuses anything else


def _load_library() -> ctypes.CDLL:
    names = [ctypes.util.find_library("crypto"), "libcrypto.so.3"]
    errors = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            return ctypes.CDLL(name)  # CDLL, not PyDLL: the GIL is released during calls
        except OSError as error:
            errors.append(f"{name}: {error}")
    raise HashStateUnavailable(
        "libcrypto not found (" + ("; ".join(errors) or "find_library found nothing") + ")"
    )


def _bind(lib: ctypes.CDLL, spec: _Spec) -> _Functions:
    try:
        init = getattr(lib, f"{spec.prefix}_Init")
        update = getattr(lib, f"{spec.prefix}_Update")
        final = getattr(lib, f"{spec.prefix}_Final")
    except AttributeError as error:
        raise HashStateUnavailable(
            f"libcrypto ({lib._name}) lacks the low-level {spec.prefix} functions: {error}"
        ) from None
    ctx_p = ctypes.POINTER(spec.ctx)
    init.argtypes = (ctx_p,)
    init.restype = ctypes.c_int
    update.argtypes = (ctx_p, ctypes.c_void_p, ctypes.c_size_t)
    update.restype = ctypes.c_int
    final.argtypes = (ctypes.c_void_p, ctx_p)
    final.restype = ctypes.c_int
    return _Functions(init, update, final)


def _self_test(spec: _Spec, fns: _Functions) -> None:
    """Checks the struct layout against the library: a context inside a guarded buffer,
    the digest and counters of b"abc", and no byte written past the end of the struct."""
    if ctypes.sizeof(spec.ctx) != spec.size or spec.native.size != spec.size:
        raise HashStateUnavailable(f"{spec.name}: context struct is not {spec.size} bytes")
    guard = 256
    room = (ctypes.c_uint8 * (spec.size + guard))(*([0xA5] * (spec.size + guard)))
    ctx = ctypes.cast(room, ctypes.POINTER(spec.ctx))
    ok = fns.init(ctx) == 1 and fns.update(ctx, b"abc", 3) == 1
    fields = spec.native.unpack_from(room)
    counters_ok = fields[spec.words - 2 : spec.words] == (24, 0) and fields[spec.words + 1] == 3
    out = ctypes.create_string_buffer(spec.digest_size)
    ok = ok and fns.final(out, ctx) == 1
    if not (ok and counters_ok and out.raw.hex() == spec.known):
        raise HashStateUnavailable(f"libcrypto's {spec.prefix} functions fail the self-test")
    if bytes(room[spec.size :]) != b"\xa5" * guard:
        raise HashStateUnavailable(f"libcrypto's {spec.prefix}_CTX is larger than expected")


def _load() -> dict[str, _Functions]:
    lib = _load_library()
    functions = {}
    for spec in _SPECS.values():
        fns = _bind(lib, spec)
        _self_test(spec, fns)
        functions[spec.name] = fns
    return functions


try:
    _FUNCTIONS: dict[str, _Functions] = _load()
    UNAVAILABLE_REASON: str | None = None
except HashStateUnavailable as _error:
    _FUNCTIONS = {}
    UNAVAILABLE_REASON = str(_error)

AVAILABLE = UNAVAILABLE_REASON is None


def _spec(algorithm: str) -> _Spec:
    spec = _SPECS.get(algorithm)
    if spec is None:
        raise ValueError(f"unsupported algorithm {algorithm!r} (supported: {ALGORITHMS})")
    if UNAVAILABLE_REASON is not None:
        raise HashStateUnavailable(f"resumable {algorithm} is unavailable: {UNAVAILABLE_REASON}")
    return spec


class ResumableHash:
    """A SHA-256 or MD5 hasher with `state()`/`from_state()`.

    Same use as a hashlib object (`update`, `digest`, `hexdigest`, `copy`); `hexdigest` does
    not end the stream. `bytes_hashed` counts what went through `update` and is saved with
    the state, so a restored hasher knows where in the stream it is. Safe to share between
    threads (calls on one hasher are serialized), but one hasher per lane is the intent.
    """

    __slots__ = ("_ctx", "_fns", "_lock", "_spec", "bytes_hashed")

    def __init__(self, algorithm: str) -> None:
        self._spec = _spec(algorithm)
        self._fns = _FUNCTIONS[algorithm]
        self._ctx = self._spec.ctx()
        self._lock = threading.Lock()
        self.bytes_hashed = 0
        if self._fns.init(self._ctx) != 1:
            raise HashStateUnavailable(f"{self._spec.prefix}_Init failed")

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def algorithm(self) -> str:
        return self._spec.name

    @property
    def digest_size(self) -> int:
        return self._spec.digest_size

    @property
    def block_size(self) -> int:
        return _BLOCK

    def update(self, data: Buffer) -> None:
        """Hashes `data` in place (bytes, bytearray or any C-contiguous memoryview)."""
        if isinstance(data, bytes):
            with self._lock:
                self._update(data, len(data))
            return
        view = data if isinstance(data, memoryview) else memoryview(data)
        if not view.c_contiguous:
            raise BufferError("hashing needs a C-contiguous buffer")
        n = view.nbytes
        if not n:
            return
        if not view.readonly:
            # a ctypes array over the buffer; it holds the export until it is dropped
            array = (ctypes.c_char * n).from_buffer(view)
            with self._lock:
                self._update(array, n)
            return
        # read-only and not bytes (a slice of bytes, mmap, ...): borrow its pointer
        pybuf = _PyBuffer()
        _get_buffer(view, ctypes.byref(pybuf), _PYBUF_SIMPLE)
        try:
            with self._lock:
                self._update(pybuf.buf, n)
        finally:
            _release_buffer(ctypes.byref(pybuf))

    def _update(self, pointer: object, n: int) -> None:
        if self._fns.update(self._ctx, pointer, n) != 1:
            raise RuntimeError(f"{self._spec.prefix}_Update failed")
        self.bytes_hashed += n

    def digest(self) -> bytes:
        """The digest of everything so far; the hasher goes on accepting data."""
        with self._lock:
            scratch = self._spec.ctx.from_buffer_copy(self._ctx)
        out = ctypes.create_string_buffer(self._spec.digest_size)
        if self._fns.final(out, scratch) != 1:
            raise RuntimeError(f"{self._spec.prefix}_Final failed")
        return out.raw

    def hexdigest(self) -> str:
        return self.digest().hex()

    def copy(self) -> Self:
        clone = type(self).__new__(type(self))
        clone._spec = self._spec
        clone._fns = self._fns
        clone._lock = threading.Lock()
        with self._lock:
            clone._ctx = self._spec.ctx.from_buffer_copy(self._ctx)
            clone.bytes_hashed = self.bytes_hashed
        return clone

    __copy__ = copy

    def state(self) -> bytes:
        """The running state as plain bytes (for a database row); see `from_state`."""
        spec = self._spec
        with self._lock:
            fields = spec.native.unpack(bytes(self._ctx))
            hashed = self.bytes_hashed
        return _HEADER.pack(_MAGIC, STATE_VERSION, spec.tag, hashed) + spec.portable.pack(*fields)

    @classmethod
    def from_state(cls, algorithm: str, state: bytes) -> Self:
        """A hasher that continues where the one that saved `state` stopped.

        Raises ValueError if `state` is not a version-1 state of `algorithm`."""
        spec = _spec(algorithm)
        state = bytes(state)
        if len(state) != _HEADER.size + spec.size:
            raise ValueError(
                f"{algorithm} state must be {_HEADER.size + spec.size} bytes, not {len(state)}"
            )
        magic, version, tag, hashed = _HEADER.unpack_from(state)
        if magic != _MAGIC:
            raise ValueError("not a saved hash state (bad magic)")
        if version != STATE_VERSION:
            raise ValueError(f"unsupported hash state version {version}")
        if tag != spec.tag:
            other = _BY_TAG.get(tag)
            raise ValueError(
                f"the state is of {other.name if other else f'unknown algorithm {tag}'}, "
                f"not {algorithm}"
            )
        fields = spec.portable.unpack_from(state, _HEADER.size)
        spec.check(fields, hashed)
        hasher = cls.__new__(cls)
        hasher._spec = spec
        hasher._fns = _FUNCTIONS[algorithm]
        hasher._lock = threading.Lock()
        hasher._ctx = spec.ctx.from_buffer_copy(spec.native.pack(*fields))
        hasher.bytes_hashed = hashed
        return hasher

    def __repr__(self) -> str:
        return f"<ResumableHash {self.name} at {self.bytes_hashed} bytes>"


def new(algorithm: str) -> ResumableHash:
    return ResumableHash(algorithm)


def sha256() -> ResumableHash:
    return ResumableHash("sha256")


def md5() -> ResumableHash:
    return ResumableHash("md5")


__all__ = [
    "ALGORITHMS",
    "AVAILABLE",
    "STATE_VERSION",
    "UNAVAILABLE_REASON",
    "HashStateUnavailable",
    "ResumableHash",
    "md5",
    "new",
    "sha256",
]
