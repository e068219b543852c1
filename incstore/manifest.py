"""Manifest: the JSON record of one save, listing every item with what restoring it needs.

A manifest names, for each store item, its NAR hash and size, its references, its DB
registration data and its chunk (key, file size, XXH3-128). It is read from places an attacker
may write (a shared chunk store's `manifests/`, a CI cache), so the reader is strict: every
field is checked against schema/FORMAT.md before anything is planned, and a document that
breaks any rule is refused whole with one line naming the rule.

Version 2 keeps each item as one JSON array (positions fixed by FORMAT.md) and references as
indices, so that a 200,000-item manifest is read in bounded memory: the reader walks the items
array one element at a time and keeps only compact columns (`Manifest`), never the whole JSON
tree. Version 1 (an object per item) is still understood for what gc needs (its chunk keys) and
refused, with a clear message, by everything else.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import json
import os
import re
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, overload

from incstore import __version__, atomicfile, regularfile
from incstore.db import FLAVOURS, Flavour, PathInfo
from incstore.errors import ManifestError
from incstore.storepath import (
    HASH_PART_LEN,
    KEY_RE,
    NIX32_ALPHABET,
    STORE_NAME_PATTERN,
    StorePath,
)

FORMAT = "incstore-manifest"
VERSION = 2
LEGACY_VERSIONS = (1,)
MAX_BYTES = 1 << 30  # a 200,000-item manifest is about 70 MB
MAX_INT = (1 << 63) - 1  # SQLite's integer range
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_XXH_RE = re.compile(r"[0-9a-f]{32}")
_CREATED_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_SIG_RE = re.compile(r"[\x21-\x7e]+")  # `name:base64`: printable ASCII, no space
_CA_RE = re.compile(r"[\x20-\x7e]*")
_OUTPUT_ID_RE = re.compile(r"[A-Za-z0-9_+\-.]{1,64}")
_WS = re.compile(rb"[ \t\n\r]*")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_TOP_FIELDS = ("format", "version", "flavour", "store_dir", "name", "created", "tool",
               "external", "items")
# item array positions (FORMAT.md section 6)
(_PATH, _NAR_HASH, _NAR_SIZE, _REFS, _DERIVER, _REG_TIME, _OUTPUTS, _KEY, _CHUNK_SIZE, _XXH3,
 _SEEN, _EXTRA) = range(12)
ITEM_FIELDS = ("path", "nar_hash", "nar_size", "references", "deriver", "registration_time",
               "derivation_outputs", "chunk_key", "chunk_size", "chunk_xxh3_128", "seen",
               "extra")
_EXTRA_FIELDS = {"guix": {"sigs", "upstream_narinfo"},
                 "nix": {"sigs", "upstream_narinfo", "ultimate", "ca"}}
MAX_SIGS = 16
MAX_SIG_LEN = 4096


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where an item's chunk is and how to check it without decompressing it."""

    key: str
    size: int
    xxh3_128: str


@dataclass(frozen=True, slots=True)
class Item:
    """One manifest entry: the DB row to register, the chunk that holds it, and how it is
    vouched for (signatures over its Nix fingerprint; an upstream Guix narinfo kept beside the
    chunk)."""

    info: PathInfo
    chunk: ChunkRef
    seen: int = 0  # last save in which the item was valid in the saved store
    sigs: tuple[str, ...] = ()
    upstream_narinfo: bool = False

    @property
    def path(self) -> str:
        return self.info.path


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def saved_at(manifest: Manifest | None, mtime: float) -> float:
    """When a manifest was last saved: the time recorded inside it (it survives a cache's
    tar round trip, which an mtime may not), or its file's mtime if later."""
    if manifest is None or not manifest.created:
        return mtime
    try:
        return max(mtime, calendar.timegm(time.strptime(manifest.created, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return mtime


def check_name(name: str) -> str:
    """A manifest name is used as a file name in the chunk store: keep it to a safe alphabet."""
    if not NAME_RE.fullmatch(name):
        raise ManifestError(f"invalid manifest name {name!r} (letters, digits, . _ + -)")
    return name


def _fail(message: str, item: str | None = None) -> ManifestError:
    return ManifestError(message, item=item)


def _int_in(value: object, low: int, high: int = MAX_INT) -> bool:
    return type(value) is int and low <= value <= high


@dataclass
class _Columns:
    """The items of a manifest as parallel arrays: a few hundred bytes an item."""

    paths: list[str] = field(default_factory=list)
    hashes: bytearray = field(default_factory=bytearray)  # 32 bytes an item
    nar_sizes: array[int] = field(default_factory=lambda: array("q"))
    ref_ends: array[int] = field(default_factory=lambda: array("q"))
    refs: array[int] = field(default_factory=lambda: array("q"))
    derivers: list[str | None] = field(default_factory=list)
    reg_times: array[int] = field(default_factory=lambda: array("q"))
    outputs: dict[int, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    keys: dict[int, str] = field(default_factory=dict)  # only keys other than the hash part
    chunk_sizes: array[int] = field(default_factory=lambda: array("q"))
    xxh3s: bytearray = field(default_factory=bytearray)  # 16 bytes an item
    seen: array[int] = field(default_factory=lambda: array("q"))
    extras: dict[int, dict[str, Any]] = field(default_factory=dict)


class Manifest:
    """A validated manifest: flavour, header fields and the items, sorted by path.

    Items are stored column-wise; `items` is a lazy sequence of `Item` views and `paths` the
    sorted list of store paths, so a caller that needs only paths, keys or sizes of a large
    manifest never materialises the rest.
    """

    def __init__(self, flavour: Flavour, columns: _Columns, *, created: str, name: str | None,
                 external: tuple[str, ...], tool: str = f"incstore {__version__}") -> None:
        self.flavour = flavour
        self._c = columns
        self.created = created
        self.name = name
        self.external = external
        self.tool = tool

    # construction from items (a save) --------------------------------------------------
    @classmethod
    def from_items(cls, flavour: Flavour, items: Iterable[Item], *, created: str = "",
                   name: str | None = None, external: Iterable[str] = ()) -> Manifest:
        """Build a manifest from items; references must be items or `external` (closed)."""
        ordered = sorted(items, key=lambda i: i.path)
        ext = tuple(sorted(set(external)))
        index = {item.path: n for n, item in enumerate(ordered)}
        index.update({p: len(ordered) + n for n, p in enumerate(ext)})
        c = _Columns()
        for n, item in enumerate(ordered):
            info = item.info
            c.paths.append(info.path)
            c.hashes += bytes.fromhex(info.hash.removeprefix("sha256:"))
            c.nar_sizes.append(info.nar_size)
            try:
                c.refs.extend(sorted(index[r] for r in info.references))
            except KeyError as e:
                raise _fail(f"reference {e.args[0]} is not in the manifest (not closed)",
                            info.path) from None
            c.ref_ends.append(len(c.refs))
            c.derivers.append(info.deriver)
            c.reg_times.append(info.registration_time)
            if info.derivation_outputs:
                c.outputs[n] = tuple(sorted(info.derivation_outputs))
            if item.chunk.key != _hash_part(info.path, flavour):
                c.keys[n] = item.chunk.key
            c.chunk_sizes.append(item.chunk.size)
            c.xxh3s += bytes.fromhex(item.chunk.xxh3_128)
            c.seen.append(item.seen)
            extra = _extra_of(item, flavour)
            if extra:
                c.extras[n] = extra
        return cls(flavour, c, created=created, name=name, external=ext)

    # size and lookup --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._c.paths)

    @property
    def store_dir(self) -> str:
        return self.flavour.store_dir

    @property
    def paths(self) -> Sequence[str]:
        return self._c.paths

    def index(self, path: str) -> int | None:
        n = bisect_left(self._c.paths, path)
        return n if n < len(self._c.paths) and self._c.paths[n] == path else None

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.index(path) is not None

    @property
    def items(self) -> _ItemsView:
        return _ItemsView(self)

    def item(self, n: int) -> Item:
        c = self._c
        path = c.paths[n]
        extra = c.extras.get(n, {})
        sigs = tuple(extra.get("sigs", ()))
        info = PathInfo(
            path=path,
            hash="sha256:" + c.hashes[32 * n: 32 * n + 32].hex(),
            nar_size=c.nar_sizes[n],
            registration_time=c.reg_times[n],
            deriver=c.derivers[n],
            references=self.references(n),
            derivation_outputs=c.outputs.get(n, ()),
            ultimate=extra.get("ultimate") if self.flavour.extra_columns else None,
            sigs=(" ".join(sigs) or None) if self.flavour.extra_columns else None,
            ca=extra.get("ca") if self.flavour.extra_columns else None,
        )
        return Item(info, self.chunk(n), c.seen[n], sigs, bool(extra.get("upstream_narinfo")))

    def by_path(self) -> dict[str, Item]:
        """Every item by path: for small manifests and tests, not for hot paths."""
        return {item.path: item for item in self.items}

    # columns --------------------------------------------------------------------------
    def ref_indices(self, n: int) -> array[int]:
        c = self._c
        return c.refs[(c.ref_ends[n - 1] if n else 0): c.ref_ends[n]]

    def references(self, n: int) -> tuple[str, ...]:
        count = len(self._c.paths)
        return tuple(self._c.paths[r] if r < count else self.external[r - count]
                     for r in self.ref_indices(n))

    def nar_hash(self, n: int) -> str:
        return "sha256:" + self._c.hashes[32 * n: 32 * n + 32].hex()

    def nar_size(self, n: int) -> int:
        return self._c.nar_sizes[n]

    def chunk_key(self, n: int) -> str:
        key = self._c.keys.get(n)
        return key if key is not None else _hash_part(self._c.paths[n], self.flavour)

    def chunk(self, n: int) -> ChunkRef:
        return ChunkRef(self.chunk_key(n), self._c.chunk_sizes[n],
                        self._c.xxh3s[16 * n: 16 * n + 16].hex())

    def seen(self, n: int) -> int:
        return self._c.seen[n]

    def deriver(self, n: int) -> str | None:
        return self._c.derivers[n]

    def registration_time(self, n: int) -> int:
        return self._c.reg_times[n]

    # comparison and output ---------------------------------------------------------------
    def same_content(self, other: Manifest) -> bool:
        """Whether the two documents differ only in when and by what they were written."""
        return ((self.flavour, self.name, self.external) ==
                (other.flavour, other.name, other.external) and self._c == other._c)

    def to_json(self) -> dict[str, Any]:
        return {**self.header(), "items": [self._item_array(n) for n in range(len(self))]}

    def _item_array(self, n: int) -> list[Any]:
        c = self._c
        return [c.paths[n], self.nar_hash(n), c.nar_sizes[n], list(self.ref_indices(n)),
                c.derivers[n], c.reg_times[n], [list(o) for o in c.outputs.get(n, ())],
                self.chunk_key(n), c.chunk_sizes[n], c.xxh3s[16 * n: 16 * n + 16].hex(),
                c.seen[n], c.extras.get(n)]

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "flavour": self.flavour.name,
                "store_dir": self.store_dir, "name": self.name, "created": self.created,
                "tool": self.tool, "external": list(self.external)}

    def to_bytes(self) -> bytes:
        """The canonical serialisation: header fields sorted, then the items last, one item
        per line, so that diffs and streaming readers see one item at a time."""
        head = json.dumps(self.header(), sort_keys=True, separators=(",", ":"))
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        lines = ",\n".join(dumps(self._item_array(n)) for n in range(len(self)))
        return f'{head[:-1]},"items":[\n{lines}\n]}}\n'.encode()

    def write(self, path: Path) -> None:
        atomicfile.write_bytes(path, self.to_bytes())

    def renamed(self, name: str | None) -> Manifest:
        return Manifest(self.flavour, self._c, created=self.created, name=name,
                        external=self.external, tool=self.tool)


class _ItemsView(Sequence[Item]):
    def __init__(self, manifest: Manifest) -> None:
        self._m = manifest

    def __len__(self) -> int:
        return len(self._m)

    @overload
    def __getitem__(self, n: int) -> Item: ...

    @overload
    def __getitem__(self, n: slice) -> list[Item]: ...

    def __getitem__(self, n: int | slice) -> Item | list[Item]:
        if isinstance(n, slice):
            return [self._m.item(i) for i in range(*n.indices(len(self._m)))]
        if n < 0:
            n += len(self._m)
        if not 0 <= n < len(self._m):
            raise IndexError(n)
        return self._m.item(n)

    def __iter__(self) -> Iterator[Item]:
        return (self._m.item(n) for n in range(len(self._m)))


def _hash_part(path: str, flavour: Flavour) -> str:
    start = len(flavour.store_dir) + 1
    return path[start: start + HASH_PART_LEN]


def _extra_of(item: Item, flavour: Flavour) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if item.sigs:
        extra["sigs"] = list(item.sigs)
    if item.upstream_narinfo:
        extra["upstream_narinfo"] = True
    if flavour.extra_columns:
        if item.info.ultimate is not None:
            extra["ultimate"] = item.info.ultimate
        if item.info.ca is not None:
            extra["ca"] = item.info.ca
    return extra


# reading ------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _fail(f"duplicate JSON key {dup!r}")
    return doc


def _reject_constant(name: str) -> None:
    raise _fail(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


class _Parser:
    """A strict reader of one manifest document that never holds the whole JSON tree, nor the
    whole document: it reads the bytes a chunk at a time (from memory or a file) and decodes
    each value from a window just large enough for it. A manifest may be tens of megabytes;
    only its columns are kept."""

    CHUNK = 1 << 20
    WINDOW = 4096
    LOOKAHEAD = 1 << 16  # what an item written by incstore fits in, almost always

    def __init__(self, read: Callable[[int], bytes], source: str) -> None:
        self.read = read
        self.source = source
        self.buf = b""
        self.pos = 0  # in buf
        self.offset = 0  # of buf[0] in the document
        self.eof = False
        self.total = 0
        self.fields: dict[str, Any] = {}

    def fail(self, message: str, item: str | None = None) -> ManifestError:
        return _fail(message, item or self.source)

    def at(self) -> int:
        return self.offset + self.pos

    def more(self, need: int) -> bool:
        """Have at least `need` bytes after the position, unless the document ends first."""
        while len(self.buf) - self.pos < need:
            if self.eof:
                return False
            chunk = self.read(max(self.CHUNK, need))
            if not chunk:
                self.eof = True
                return False
            self.total += len(chunk)
            if self.total > MAX_BYTES:
                raise self.fail(f"manifest is larger than {MAX_BYTES} bytes")
            self.offset += self.pos
            self.buf = self.buf[self.pos:] + chunk
            self.pos = 0
        return True

    def rest(self) -> bytes:
        """Everything from the position to the end (read now; bounded by MAX_BYTES)."""
        self.more(MAX_BYTES + 1)
        return self.buf[self.pos:]

    def ws(self) -> None:
        while True:
            m = _WS.match(self.buf, self.pos)
            assert m is not None
            self.pos = m.end()
            if self.pos < len(self.buf) or not self.more(1):
                return

    def peek(self) -> str:
        self.ws()
        return chr(self.buf[self.pos]) if self.pos < len(self.buf) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.fail(f"invalid JSON: expected {char!r} at offset {self.at()}")
        self.pos += 1

    def value(self) -> Any:
        self.ws()
        size = self.WINDOW
        while True:
            self.more(size)
            end = min(len(self.buf), self.pos + size)
            whole = self.eof and end == len(self.buf)  # the window holds all that is left
            text = self._decode(self.buf[self.pos: end], whole)
            try:
                value, used = _DECODER.raw_decode(text)
            except json.JSONDecodeError as e:
                if not whole:
                    size *= 4  # the value may go on past the window
                    continue
                raise self.fail(f"invalid JSON: {e.msg} at offset {self.at() + e.pos}") \
                    from None
            except RecursionError:
                raise self.fail("invalid JSON: nested too deeply") from None
            except ValueError as e:  # an integer beyond Python's digit limit
                raise self.fail(f"invalid JSON: {e}") from None
            if not whole and (used == len(text) or text[used] in _NUMBER_CHARS):
                size *= 4  # a number the window cut short may parse: look further
                continue
            self.pos += len(text[:used].encode("utf-8"))
            return value

    def _decode(self, chunk: bytes, whole: bool) -> str:
        try:
            return chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            if not whole and e.reason == "unexpected end of data":
                return chunk[: e.start].decode("utf-8")  # a character the window cut
            raise self.fail(f"not UTF-8 ({e.reason} at byte {self.at() + e.start})") from None

    def document(self, on_item: Any, fast: Any = None) -> dict[str, Any]:
        """Parse the top-level object; the `items` array goes element by element to
        `on_item` (or `fast`, which takes the bytes and offset and returns the offset after
        the element when it accepted it); every other field is returned."""
        fields = self.fields
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
        else:
            while True:
                key = self.value()
                if not isinstance(key, str):
                    raise self.fail("invalid JSON: object key is not a string")
                self.expect(":")
                if key in fields:
                    raise self.fail(f"duplicate JSON key {key!r}")
                if key == "items":
                    if self.peek() != "[":
                        raise self.fail("items is not an array")
                    self.pos += 1
                    fields[key] = self.items(on_item, fast)
                else:
                    fields[key] = self.value()
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("}")
                break
        self.ws()
        if self.pos != len(self.buf):
            raise self.fail("invalid JSON: data after the document")
        return fields

    def items(self, on_item: Any, fast: Any = None) -> int:
        count = 0
        if self.peek() == "]":
            self.pos += 1
            return 0
        while True:
            self.ws()
            end = None
            if fast is not None:
                self.more(self.LOOKAHEAD)
                end = fast(self.buf, self.pos)
            if end is not None:
                self.pos = end
            else:
                on_item(self.value())
            count += 1
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("]")
            return count


def _check_header(doc: dict[str, Any], source: str) -> Flavour:
    if doc.get("format") != FORMAT:
        raise _fail("not an incstore manifest", source)
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        if type(version) is int and version in LEGACY_VERSIONS:
            raise _fail(f"manifest version {version} was written by an older incstore; "
                        "save again to write version 2", source)
        raise _fail(f"unknown manifest version {version!r} (this incstore reads {VERSION})",
                    source)
    unknown = sorted(set(doc) - set(_TOP_FIELDS))
    if unknown:
        raise _fail(f"unknown field {unknown[0]!r}", source)
    missing = [f for f in _TOP_FIELDS if f not in doc]
    if missing:
        raise _fail(f"missing field {missing[0]!r}", source)
    flavour = FLAVOURS.get(doc["flavour"]) if isinstance(doc["flavour"], str) else None
    if flavour is None:
        raise _fail(f"unknown flavour {doc['flavour']!r}", source)
    if doc["store_dir"] != flavour.store_dir:
        raise _fail(f"store_dir {doc['store_dir']!r} is not {flavour.store_dir}", source)
    name = doc["name"]
    if name is not None and not (isinstance(name, str) and NAME_RE.fullmatch(name)):
        raise _fail(f"invalid manifest name {name!r}", source)
    if not (isinstance(doc["created"], str) and _CREATED_RE.fullmatch(doc["created"])):
        raise _fail(f"bad created time {doc['created']!r}", source)
    if not (isinstance(doc["tool"], str) and len(doc["tool"]) <= 200):
        raise _fail("bad tool field", source)
    return flavour


_OUTPUT_PAIR_RE = re.compile(rb'\["([^"]*)","([^"]*)"\]')  # within an already matched item


def _canonical_item_re(store_prefix: str) -> re.Pattern[bytes]:
    """One item array exactly as `dumps` writes it, with `extra` null. Store names, hashes,
    keys and output ids never need JSON escapes, so the match sees the decoded values."""
    path = re.escape(store_prefix) + STORE_NAME_PATTERN
    nat = r"(?:0|[1-9][0-9]{0,18})"
    pos = r"[1-9][0-9]{0,18}"
    key = f"[{NIX32_ALPHABET}]{{{HASH_PART_LEN}}}(?:\\.[{NIX32_ALPHABET}]{{8,52}})?"
    output = r'\["[A-Za-z0-9_+\-.]{1,64}","' + path + r'"\]'
    return re.compile((
        rf'\["({path})","sha256:([0-9a-f]{{64}})",({pos}),\[((?:{nat}(?:,{nat})*)?)\],'
        rf'(?:null|"({path})"),({nat}),\[((?:{output}(?:,{output})*)?)\],'
        rf'"({key})",({pos}),"([0-9a-f]{{32}})",({nat}),null\]').encode("ascii"))


class _ItemReader:
    """Validates item arrays one at a time and appends them to the columns."""

    def __init__(self, flavour: Flavour, source: str) -> None:
        self.flavour = flavour
        self.source = source
        self.c = _Columns()
        self.max_ref = -1
        self.store_prefix = flavour.store_dir + "/"
        self.allowed_extra = _EXTRA_FIELDS[flavour.name]
        # what StorePath.parse accepts, in one match (a manifest may hold 200,000 paths)
        self.path_re = re.compile(re.escape(self.store_prefix) + STORE_NAME_PATTERN)
        self.line_re = _canonical_item_re(self.store_prefix)
        self.ids: dict[str, str] = {}

    def path(self, value: object, item: str | None) -> str:
        if not isinstance(value, str):
            raise _fail("store path is not a string", item or self.source)
        if not self.path_re.fullmatch(value):
            StorePath.parse(value, self.flavour.store_dir)  # raises, saying what is wrong
        return value

    def fast(self, data: bytes, pos: int) -> int | None:
        """Take the item at `pos` if it is written the way incstore writes it (compact, no
        extra fields); return the offset after it, or None to let the generic reader decide.
        The pattern checks the syntax and formats; the rest is checked here as in __call__.
        This is what makes a 200,000-item manifest cost a fraction of a second less per
        10,000 items, so it must accept nothing the generic reader rejects."""
        m = self.line_re.match(data, pos)
        if m is None:
            return None
        # the pattern admits ASCII only
        (path_b, nar_hash_b, nar_size, refs_text, deriver_b, reg_time, outputs_text, key_b,
         chunk_size, xxh_b, seen) = m.groups()
        path, nar_hash, key, xxh = (path_b.decode(), nar_hash_b.decode(), key_b.decode(),
                                    xxh_b.decode())
        deriver = deriver_b.decode() if deriver_b is not None else None
        c = self.c
        prefix_len = len(self.store_prefix)
        if c.paths:
            last = c.paths[-1]
            if path <= last:
                raise _fail("items are not sorted by path, or a path appears twice", path)
            if last[prefix_len: prefix_len + HASH_PART_LEN] == \
                    path[prefix_len: prefix_len + HASH_PART_LEN]:
                raise _fail("two items share a hash part", path)
        refs = [int(r) for r in refs_text.split(b",")] if refs_text else []
        numbers = (int(nar_size), int(reg_time), int(chunk_size), int(seen))
        if max(numbers) > MAX_INT or (refs and refs[-1] > MAX_INT):
            return None  # out of range: the generic reader names the field
        if refs != sorted(set(refs)):
            raise _fail("references are not sorted indices without repeats", path)
        outputs: tuple[tuple[str, str], ...] = ()
        if outputs_text:
            outputs = tuple((self.output_id(o.decode()), p.decode())
                            for o, p in _OUTPUT_PAIR_RE.findall(outputs_text))
            if list(outputs) != sorted(set(outputs)) or len({o for o, _ in outputs}) != \
                    len(outputs):
                raise _fail("derivation_outputs are not sorted with unique ids", path)
            if not path.endswith(".drv"):
                raise _fail("derivation_outputs on an item that is not a .drv", path)
        hash_part = path[prefix_len: prefix_len + HASH_PART_LEN]
        if key[:HASH_PART_LEN] != hash_part:
            raise _fail("chunk key does not match the store path", path)
        n = len(c.paths)
        c.paths.append(path)
        c.hashes += bytes.fromhex(nar_hash)
        c.nar_sizes.append(numbers[0])
        if refs:
            c.refs.extend(refs)
            self.max_ref = max(self.max_ref, refs[-1])
        c.ref_ends.append(len(c.refs))
        c.derivers.append(deriver)
        c.reg_times.append(numbers[1])
        if outputs:
            c.outputs[n] = outputs
        if len(key) > HASH_PART_LEN:
            c.keys[n] = key
        c.chunk_sizes.append(numbers[2])
        c.xxh3s += bytes.fromhex(xxh)
        c.seen.append(numbers[3])
        return m.end()

    def output_id(self, name: str) -> str:
        """One string object per output id ("out" is on most derivations)."""
        return self.ids.setdefault(name, name)

    def share_strings(self) -> None:
        """Make derivers and output paths that are items of the manifest the same string
        objects as the items' paths (in a large manifest they are a quarter of its strings)."""
        c = self.c
        canon = {p: p for p in c.paths}
        c.derivers = [canon.get(d, d) if d is not None else None for d in c.derivers]
        for n, outs in c.outputs.items():
            c.outputs[n] = tuple((o, canon.get(p, p)) for o, p in outs)

    def __call__(self, raw: object) -> None:
        c = self.c
        n = len(c.paths)
        if not isinstance(raw, list) or len(raw) != len(ITEM_FIELDS):
            raise _fail(f"item {n} is not an array of {len(ITEM_FIELDS)} fields", self.source)
        path = self.path(raw[_PATH], None)
        if c.paths and path <= c.paths[-1]:
            raise _fail("items are not sorted by path, or a path appears twice", path)
        hash_part = path[len(self.store_prefix): len(self.store_prefix) + HASH_PART_LEN]
        if c.paths and c.paths[-1].startswith(self.store_prefix + hash_part):
            raise _fail("two items share a hash part", path)
        nar_hash = raw[_NAR_HASH]
        if not (isinstance(nar_hash, str) and _HASH_RE.fullmatch(nar_hash)):
            raise _fail("bad nar_hash", path)
        if not _int_in(raw[_NAR_SIZE], 1):
            raise _fail("bad nar_size", path)
        refs = raw[_REFS]
        if not isinstance(refs, list) or not all(_int_in(r, 0) for r in refs):
            raise _fail("bad references", path)
        if any(b <= a for a, b in pairwise(refs)):
            raise _fail("references are not sorted indices without repeats", path)
        deriver = raw[_DERIVER]
        if deriver is not None:
            self.path(deriver, path)
        if not _int_in(raw[_REG_TIME], 0):
            raise _fail("bad registration_time", path)
        outputs = raw[_OUTPUTS]
        if not isinstance(outputs, list):
            raise _fail("bad derivation_outputs", path)
        parsed_outputs: list[tuple[str, str]] = []
        for out in outputs:
            if not (isinstance(out, list) and len(out) == 2 and isinstance(out[0], str)
                    and _OUTPUT_ID_RE.fullmatch(out[0])):
                raise _fail("bad derivation_outputs entry", path)
            parsed_outputs.append((self.output_id(out[0]), self.path(out[1], path)))
        if parsed_outputs != sorted(set(parsed_outputs)) or len(
                {o for o, _ in parsed_outputs}) != len(parsed_outputs):
            raise _fail("derivation_outputs are not sorted with unique ids", path)
        if parsed_outputs and not path.endswith(".drv"):
            raise _fail("derivation_outputs on an item that is not a .drv", path)
        key = raw[_KEY]
        if not (isinstance(key, str) and KEY_RE.fullmatch(key)):
            raise _fail(f"invalid chunk key {key!r}", path)
        if key[:HASH_PART_LEN] != hash_part or (len(key) > HASH_PART_LEN
                                                and key[HASH_PART_LEN] != "."):
            raise _fail("chunk key does not match the store path", path)
        if not _int_in(raw[_CHUNK_SIZE], 1):
            raise _fail("bad chunk size", path)
        xxh = raw[_XXH3]
        if not (isinstance(xxh, str) and _XXH_RE.fullmatch(xxh)):
            raise _fail("bad chunk xxh3_128", path)
        if not _int_in(raw[_SEEN], 0):
            raise _fail("bad seen time", path)
        extra = raw[_EXTRA]
        if extra is not None:
            self.check_extra(extra, path)
        # all checked: append
        c.paths.append(path)
        c.hashes += bytes.fromhex(nar_hash[7:])
        c.nar_sizes.append(raw[_NAR_SIZE])
        c.refs.extend(refs)
        c.ref_ends.append(len(c.refs))
        if refs:
            self.max_ref = max(self.max_ref, refs[-1])
        c.derivers.append(deriver)
        c.reg_times.append(raw[_REG_TIME])
        if parsed_outputs:
            c.outputs[n] = tuple(parsed_outputs)
        if len(key) > HASH_PART_LEN:
            c.keys[n] = key
        c.chunk_sizes.append(raw[_CHUNK_SIZE])
        c.xxh3s += bytes.fromhex(xxh)
        c.seen.append(raw[_SEEN])
        if extra:
            c.extras[n] = extra

    def check_extra(self, extra: object, path: str) -> None:
        if not isinstance(extra, dict) or not extra:
            raise _fail("bad extra field (an object, or null when empty)", path)
        unknown = sorted(set(extra) - self.allowed_extra)
        if unknown:
            raise _fail(f"unknown extra field {unknown[0]!r}", path)
        sigs = extra.get("sigs", [])
        if "sigs" in extra and not (isinstance(sigs, list) and 0 < len(sigs) <= MAX_SIGS):
            raise _fail("bad sigs", path)
        if not all(isinstance(s, str) and len(s) <= MAX_SIG_LEN and _SIG_RE.fullmatch(s)
                   for s in sigs):
            raise _fail("bad signature string", path)
        if "upstream_narinfo" in extra and extra["upstream_narinfo"] is not True:
            raise _fail("bad upstream_narinfo (true or absent)", path)
        if "ultimate" in extra and not _int_in(extra["ultimate"], 0, 1):
            raise _fail("bad ultimate", path)
        ca = extra.get("ca", "")
        if not (isinstance(ca, str) and len(ca) <= 1024 and _CA_RE.fullmatch(ca)):
            raise _fail("bad ca", path)


def _check_external(value: object, reader: _ItemReader, source: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail("bad external list", source)
    external = tuple(reader.path(p, source) for p in value)
    if any(b <= a for a, b in pairwise(external)):
        raise _fail("external paths are not sorted without repeats", source)
    items = reader.c.paths
    for path in external:
        n = bisect_left(items, path[: len(reader.store_prefix) + HASH_PART_LEN])
        if n < len(items) and items[n].startswith(path[: len(reader.store_prefix)
                                                       + HASH_PART_LEN]):
            raise _fail("an external path shares its hash part with an item", path)
    return external


_PARSED: dict[tuple[bytes, str], Manifest] = {}


def from_bytes(data: bytes, source: str) -> Manifest:
    """Parse and validate a manifest document. The last few documents parsed are remembered
    (a save reads the same named manifests for several purposes; parsing costs more than
    hashing)."""
    ident = (hashlib.sha256(data).digest(), source)
    found = _PARSED.get(ident)
    if found is None:
        found = _parse(data, source)
        if len(_PARSED) >= 8:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[ident] = found
    return found


def _parse(data: bytes, source: str, fast_path: bool = True) -> Manifest:
    if len(data) > MAX_BYTES:
        raise _fail(f"manifest is larger than {MAX_BYTES} bytes", source)
    return parse_stream(io.BytesIO(data).read, source, fast_path)


def parse_stream(read: Callable[[int], bytes], source: str, fast_path: bool = True
                 ) -> Manifest:
    """Parse and validate a manifest read a chunk at a time with `read(n)`."""
    parser = _Parser(read, source)
    readers: list[_ItemReader] = []

    def reader() -> _ItemReader:
        # the header fields may follow `items`; items wait for them only when they come first
        if not readers:
            readers.append(_ItemReader(_flavour_hint(parser, source), source))
        return readers[0]

    def on_item(raw: object) -> None:
        reader()(raw)

    def fast(data: bytes, pos: int) -> int | None:
        return reader().fast(data, pos)

    fields = parser.document(on_item, fast if fast_path else None)
    flavour = _check_header(fields, source)
    if "items" not in fields or not isinstance(fields["items"], int):
        raise _fail("manifest has no items array", source)
    found = readers[0] if readers else _ItemReader(flavour, source)
    if found.flavour != flavour:
        raise _fail("items do not belong to the manifest's flavour", source)
    external = _check_external(fields["external"], found, source)
    found.share_strings()
    if found.max_ref >= len(found.c.paths) + len(external):
        raise _fail(f"reference index {found.max_ref} is past the items and external paths "
                    "(not closed)", source)
    return Manifest(flavour, found.c, created=fields["created"], name=fields["name"],
                    external=external, tool=fields["tool"])


def _flavour_hint(parser: _Parser, source: str) -> Flavour:
    """The flavour the items must be read as: the header's, when it came before them (as
    incstore writes it); else the one named after them, found without parsing (the rest of
    the document is read for that). The header is checked in full afterwards."""
    named = parser.fields.get("flavour")
    if isinstance(named, str) and named in FLAVOURS:
        return FLAVOURS[named]
    m = re.search(rb'"flavour"\s*:\s*"(guix|nix)"', parser.rest())
    if m is None:
        raise _fail("manifest names no flavour", source)
    return FLAVOURS[m.group(1).decode()]


def legacy_chunk_keys(data: bytes) -> set[str] | None:
    """The chunk keys a version-1 manifest names, for gc to keep; None if it is not one."""
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT or type(doc.get("version")) is not int or \
                doc["version"] not in LEGACY_VERSIONS:
            return None
        keys = {item["chunk"]["key"] for item in doc["items"]}
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError):
        return None
    return keys if all(isinstance(k, str) and KEY_RE.fullmatch(k) for k in keys) else None


def read_file(path: Path) -> bytes:
    """A manifest file's bytes (a regular file no larger than MAX_BYTES)."""
    try:
        return regularfile.read(path, MAX_BYTES)
    except FileNotFoundError as e:
        raise _fail("no such manifest", str(path)) from e
    except regularfile.NotRegular:
        raise _fail("not a regular file", str(path)) from None
    except regularfile.TooLarge:
        raise _fail(f"manifest is larger than {MAX_BYTES} bytes", str(path)) from None
    except OSError as e:
        raise _fail(f"cannot read: {e.strerror or e}", str(path)) from None


def load(path: Path) -> Manifest:
    """Parse the manifest file at `path`, reading it a chunk at a time."""
    try:
        with regularfile.open_binary(path) as f:
            if os.fstat(f.fileno()).st_size > MAX_BYTES:
                raise _fail(f"manifest is larger than {MAX_BYTES} bytes", str(path))
            return parse_stream(f.read, str(path))
    except FileNotFoundError as e:
        raise _fail("no such manifest", str(path)) from e
    except regularfile.NotRegular:
        raise _fail("not a regular file", str(path)) from None
    except OSError as e:
        raise _fail(f"cannot read: {e.strerror or e}", str(path)) from None
