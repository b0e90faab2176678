"""Tar archives, read once front to back: the one tar parser of the importer.

`TarParser` is a push parser: `feed` takes the next bytes of the archive, in pieces of any
size. A subclass says what each entry is to it (`on_entry`: refuse it by raising, skip its
data, or take it) and gets the data of the entries it takes (`on_data`), in views of the
caller's buffer, as it arrives: no entry is ever held whole. `TarEntries` reads the same
way from a blocking `read(n)`, one entry at a time, for a reader that pulls its input.

Read: ustar and GNU headers, GNU long names and link names (`L`, `K`), PAX extended
headers (`x`, and global ones, `g`: their `path`, `linkpath` and `size` win over the
header's), base-256 numbers, GNU old-style sparse headers (`S`) and their extension
blocks. Links, directories, devices and FIFOs have no data, whatever their size field
says. An entry is `sparse` when it is stored as a sparse file (`S`, `GNU.sparse*` PAX
keys): its data in the archive is not the file's content.

Strict: every header's checksum is checked; numbers, PAX records and PAX sizes must be
well formed; metadata entries (long names, PAX headers) may be at most `MAX_METADATA`
bytes; an archive that ends within a header, an entry's data or its padding is truncated.
It ends at a zero block, or at the end of the stream right after an entry's padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from importer.errors import InvalidImage

BLOCK: Final = 512
# Metadata in a tar (PAX records, GNU long names) larger than this is not a disk archive.
MAX_METADATA: Final = 1 << 20
# Largest read `TarEntries` makes at once.
READ_PIECE: Final = 1 << 20

REGULAR: Final = (b"0", b"\0", b"7")
DIRECTORY: Final = b"5"
# Links, devices, directories and FIFOs: a header without data.
HEADER_ONLY: Final = (b"1", b"2", b"3", b"4", b"5", b"6")
_METADATA_KINDS: Final = (b"L", b"K", b"x", b"g")
_ZERO_BLOCK: Final = bytes(BLOCK)

_HEADER, _DATA, _METADATA, _PAD, _SPARSE_MAP, _END = range(6)


@dataclass
class TarEntry:
    name: str
    type: bytes  # the header's type flag: b"0" a regular file, b"5" a directory, ...
    size: int  # data bytes of the entry in the archive
    linkname: str = ""
    sparse: bool = False


def tar_checksum_ok(block: bytes) -> bool:
    """The header's checksum is right (summed as unsigned bytes, or as signed ones like
    some old tars did)."""
    stored = parse_tar_number(block[148:156])
    if stored < 0:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:BLOCK])
    signed = unsigned - 256 * sum(1 for byte in block[:148] + block[156:BLOCK] if byte >= 128)
    return stored in (unsigned, signed)


def parse_tar_number(field: bytes) -> int:
    """An octal number, or GNU's base-256 for large values; -1 if neither."""
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            return -1
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return -1


def parse_pax_records(content: bytes, what: str = "tar") -> dict[str, str]:
    """`<length> <key>=<value>\\n` records."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(content):
        space = content.find(b" ", pos)
        try:
            length = int(content[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = content[pos : pos + length]
        key, sep, value = record[space - pos + 1 : -1].partition(b"=")
        if length <= 0 or len(record) != length or not record.endswith(b"\n") or not sep:
            raise InvalidImage(f"{what}: a pax extended header is malformed")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _header_name(block: bytes) -> str:
    name = _text(block[0:100])
    if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix may hold the name's start
        prefix = _text(block[345:500])
        if prefix:
            name = f"{prefix}/{name}"
    return name


class TarParser:
    """Push parser of a tar archive; subclasses implement `on_entry` and `on_data`."""

    def __init__(self, what: str) -> None:
        self.what = what  # names the archive in messages
        self.state = _HEADER
        self.block = bytearray()  # a header or sparse map block being collected
        self.remaining = 0  # bytes left of the current entry's data or padding
        self.padding = 0  # padding after the current entry's data
        self.offset = 0  # of the archive: bytes consumed so far
        self.taking = False  # the current entry's data goes to on_data
        self.metadata = bytearray()
        self.metadata_kind = b""
        self.long_name: str | None = None
        self.long_link: str | None = None
        self.pax: dict[str, str] = {}
        self.globals: dict[str, str] = {}
        self.sparse_entry: TarEntry | None = None  # waiting for its sparse map blocks

    def on_entry(self, entry: TarEntry) -> bool:
        """An entry's header was read: raise to refuse it; True to take its data."""
        raise NotImplementedError

    def on_data(self, piece: memoryview) -> None:
        """The next bytes of a taken entry's data; only valid during the call."""
        raise NotImplementedError

    @property
    def ended(self) -> bool:
        """The archive's end marker was read; what follows it is ignored."""
        return self.state == _END

    @property
    def wanted(self) -> int:
        """Bytes until the parser's next step (a header read, data or padding ended)."""
        if self.state in (_HEADER, _SPARSE_MAP):
            return BLOCK - len(self.block)
        return 0 if self.state == _END else self.remaining

    @property
    def data_left(self) -> int:
        """Bytes of the current entry's data not fed yet."""
        return self.remaining if self.state == _DATA else 0

    def feed(self, data: memoryview) -> None:
        pos = 0
        n = len(data)
        while pos < n:
            state = self.state
            if state == _END:
                return
            if state in (_HEADER, _SPARSE_MAP):
                take = min(BLOCK - len(self.block), n - pos)
                self.block += data[pos : pos + take]
                pos += take
                if len(self.block) == BLOCK:
                    block = bytes(self.block)
                    self.block.clear()
                    if state == _HEADER:
                        self._on_header(block)
                    else:
                        self._on_sparse_map(block)
                    self.offset += BLOCK
                continue
            take = min(self.remaining, n - pos)
            if state == _DATA:
                if self.taking:
                    self.on_data(data[pos : pos + take])
            elif state == _METADATA:
                self.metadata += data[pos : pos + take]
            pos += take
            self.offset += take
            self.remaining -= take
            if not self.remaining:
                self._after(state)

    def end(self) -> None:
        """The stream ended: raises InvalidImage if it ended within the archive."""
        if self.state not in (_HEADER, _END) or self.block:
            raise InvalidImage(f"{self.what}: the tar archive is truncated at byte {self.offset}")

    def _after(self, state: int) -> None:
        """The data of an entry or its padding is all in."""
        if state == _PAD:
            self.state = _HEADER
            return
        if state == _METADATA:
            self._on_metadata(bytes(self.metadata))
            self.metadata.clear()
        self.state, self.remaining = _PAD, self.padding
        if not self.remaining:
            self.state = _HEADER

    def _on_header(self, block: bytes) -> None:
        if block == _ZERO_BLOCK:
            self.state = _END
            return
        if not tar_checksum_ok(block):
            raise InvalidImage(
                f"{self.what}: not a tar archive (a header checksum is wrong at byte {self.offset})"
            )
        kind = block[156:157]
        size = self._number(block[124:136], "size")
        if kind in _METADATA_KINDS:
            if size > MAX_METADATA:
                raise InvalidImage(f"{self.what}: a tar header of {size} bytes is too large")
            self.metadata_kind = kind
            self._begin_data(_METADATA, size)
            return
        fields = {**self.globals, **self.pax}
        name = fields.get("path") or self.long_name or _header_name(block)
        linkname = fields.get("linkpath") or self.long_link or _text(block[157:257])
        self.pax, self.long_name, self.long_link = {}, None, None
        if "size" in fields:
            try:
                size = int(fields["size"])
            except ValueError:
                size = -1
            if size < 0:
                raise InvalidImage(f"{self.what}: the PAX size of {name!r} is not a number")
        sparse = kind == b"S" or any(key.startswith("GNU.sparse") for key in fields)
        entry = TarEntry(name, kind, 0 if kind in HEADER_ONLY else size, linkname, sparse)
        if kind == b"S" and block[482]:  # GNU old-style sparse maps go on in extra blocks
            self.sparse_entry = entry
            self.state = _SPARSE_MAP
            return
        self._begin_entry(entry)

    def _on_sparse_map(self, block: bytes) -> None:
        if not block[504]:
            entry, self.sparse_entry = self.sparse_entry, None
            assert entry is not None
            self._begin_entry(entry)

    def _begin_entry(self, entry: TarEntry) -> None:
        self.taking = self.on_entry(entry)
        self._begin_data(_DATA, entry.size)

    def _begin_data(self, state: int, size: int) -> None:
        self.state, self.remaining, self.padding = state, size, -size % BLOCK
        if not size:
            self._after(state)

    def _on_metadata(self, content: bytes) -> None:
        kind = self.metadata_kind
        if kind == b"L":
            self.long_name = _text(content)
        elif kind == b"K":
            self.long_link = _text(content)
        elif kind == b"x":
            self.pax.update(parse_pax_records(content, self.what))
        else:
            self.globals.update(parse_pax_records(content, self.what))

    def _number(self, field: bytes, what: str) -> int:
        value = parse_tar_number(field)
        if value < 0:
            raise InvalidImage(f"{self.what}: the tar header has an invalid {what}: {field!r}")
        return value


class _EntryParser(TarParser):
    """The parser under `TarEntries`: it notes each entry; the data is read by the caller."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.entry: TarEntry | None = None

    def on_entry(self, entry: TarEntry) -> bool:
        self.entry = entry
        return False

    def take_entry(self) -> TarEntry | None:
        """The entry whose header was read last, once."""
        entry, self.entry = self.entry, None
        return entry

    def on_data(self, piece: memoryview) -> None:
        return None


class TarEntries:
    """A tar archive read from `read(n)` (blocking; b"" at the end), one entry at a time:
    `next()` gives the next entry, positioned at its data, and `read_data` reads that."""

    def __init__(self, read: Callable[[int], bytes], what: str) -> None:
        self._read = read
        self._parser = _EntryParser(what)

    @property
    def remaining(self) -> int:
        """Data bytes of the current entry not read yet."""
        return self._parser.data_left

    def next(self) -> TarEntry | None:
        """The next entry (skipping what is left of the current one), None at the end."""
        parser = self._parser
        parser.take_entry()
        while not parser.ended:
            data = self._read(min(READ_PIECE, parser.wanted))
            if not data:
                parser.end()
                parser.state = _END
                break
            # Never more than `wanted`: the parser stops right after each header.
            parser.feed(memoryview(data))
            entry = parser.take_entry()
            if entry is not None:
                return entry
        return None

    def read_data(self, n: int) -> bytes:
        """Up to n bytes of the current entry's data; b"" once it is all read."""
        left = self._parser.data_left
        if not left:
            return b""
        data = self._read(min(n, left))
        if not data:
            self._parser.end()
        self._parser.feed(memoryview(data))
        return data
