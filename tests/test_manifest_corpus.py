"""Manifest corpus: good and bad manifests, each run through both the JSON Schema
(`schema/manifest.schema.json`) and the reader (`incstore.manifest.from_bytes`), which must agree.

Every case is a whole document (bytes). A case is one of:

- an **agree** case: a JSON document the schema can judge; schema and reader must both accept it
  (good) or both refuse it (bad);
- a **reader-only** case: a rule JSON Schema cannot state (duplicate keys, sort order, index
  ranges, unique hash parts, paths of the manifest's own store directory, 2.0 being an
  integer to JSON Schema, bytes that are not JSON at all). Its `reader_only` field says why; the
  reader must refuse it, and the schema must indeed be unable to (it accepts the parsed document,
  or there is no JSON document to give it).

The schema is run with ECMA-262 semantics for `$` (end of input only): Python's `re` also lets `$`
match before a final newline, which would make the schema look weaker than it is.

Also here: a chunk without the zstd content-checksum flag is refused by restore (exit 7).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from incstore import db, manifest
from incstore.errors import ChunkCorruptError, ManifestError
from incstore.manifest import MAX_INT, ChunkRef, Item, Manifest, from_bytes
from incstore.storepath import nix32_encode

from .conftest import SCHEMA, make_sample, run
from .manifests import dump, load

# --- the schema, with ECMA-262 `$` ------------------------------------------------------------


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any
                  ) -> Iterator[jsonschema.ValidationError]:
    """`pattern` as JSON Schema means it: an unescaped final `$` matches only at the very end."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    if validator.is_type(instance, "string") and not re.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                          {"pattern": _ecma_pattern})
_VALIDATOR = _Validator(SCHEMA)


@contextmanager
def _unlimited_int_digits() -> Iterator[None]:
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(old)


def schema_verdict(data: bytes) -> bool | None:
    """Whether the schema accepts the document; None if the bytes are no JSON document a
    schema could be applied to (not UTF-8, not parseable, nested beyond any parser)."""
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    with _unlimited_int_digits():  # for the document and the schema's error messages
        try:
            doc = json.loads(data.decode("utf-8"), parse_constant=no_constants)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        return bool(_VALIDATOR.is_valid(doc))


def reader_verdict(data: bytes) -> bool:
    """Whether the reader accepts the document. Anything but ManifestError is a bug."""
    try:
        from_bytes(data, "corpus")
    except ManifestError:
        return False
    return True


# --- the base manifests ----------------------------------------------------------------------


def _hash(name: str) -> str:
    return nix32_encode(hashlib.sha1(name.encode()).digest())


def _path(store: str, name: str) -> str:
    return f"{store}/{_hash(name)}-{name}"


def _base(flavour: db.Flavour) -> dict[str, Any]:
    """A small manifest using every field: references (self, item, external), a deriver, a .drv
    with outputs, a variant chunk key and an `extra`."""
    sd = flavour.store_dir
    hello, glibc = _path(sd, "hello-2.12"), _path(sd, "glibc-2.39")
    drv, data, bash = _path(sd, "hello-2.12.drv"), _path(sd, "data"), _path(sd, "bash-5.2")
    extra: dict[str, Any] = {"sigs": ["cache.example.org-1:c2lnbmF0dXJl"]}
    nix_extra = {"ultimate": 1, "ca": "fixed:r:sha256:" + "1" * 52} if flavour is db.NIX else {}

    def item(path: str, refs: tuple[str, ...], **kw: Any) -> Item:
        info = db.PathInfo(path, "sha256:" + hashlib.sha256(path.encode()).hexdigest(), 1234,
                           1700000000, references=refs, **kw)
        key = path.split("/")[3][:32] + (".0123456789ab" if path == data else "")
        return Item(info, ChunkRef(key, 99, "0" * 32), seen=1700000001,
                    sigs=tuple(extra["sigs"]) if path == hello else ())

    items = [
        item(hello, (hello, glibc), deriver=drv,
             **({"ultimate": 1, "ca": nix_extra["ca"]} if nix_extra else {})),
        item(glibc, (bash,)),
        item(drv, (glibc,), derivation_outputs=(("out", hello),)),
        item(data, ()),
    ]
    m = Manifest.from_items(flavour, items, created="2024-05-01T12:00:00Z", name="ci-main",
                            external=[bash])
    doc: dict[str, Any] = json.loads(m.to_bytes())
    return doc


GUIX = _base(db.GUIX)
NIX = _base(db.NIX)
# positions of item fields (FORMAT.md section 6)
PATH, NAR_HASH, NAR_SIZE, REFS, DERIVER, REG, OUTPUTS, KEY, CSIZE, XXH, SEEN, EXTRA = range(12)


def _n(doc: dict[str, Any], name: str) -> int:
    """Index of the item whose path ends with `name`."""
    return next(i for i, it in enumerate(doc["items"]) if it[PATH].endswith("-" + name))


def encode(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


# --- the corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    valid: bool
    reader_only: str | None = None  # why JSON Schema cannot state this rule
    xfail: str | None = None  # a known disagreement, reported


CASES: list[Case] = []
Edit = Callable[[dict[str, Any]], object]


def good(id: str, edit: Edit | None = None, base: dict[str, Any] = GUIX) -> None:
    doc = copy.deepcopy(base)
    if edit:
        edit(doc)
    CASES.append(Case(id, encode(doc), True))


def bad(id: str, edit: Edit, *, base: dict[str, Any] = GUIX, reader_only: str | None = None,
        xfail: str | None = None) -> None:
    doc = copy.deepcopy(base)
    edit(doc)
    CASES.append(Case(id, encode(doc), False, reader_only, xfail))


def raw(id: str, data: bytes, *, valid: bool = False, reader_only: str | None = None,
        xfail: str | None = None) -> None:
    CASES.append(Case(id, data, valid, reader_only, xfail))


def set_item(name: str, field: int, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["items"][_n(doc, name)][field] = value
    return edit


def set_top(key: str, value: Any) -> Edit:
    return lambda doc: doc.__setitem__(key, value)


def drop_top(key: str) -> Edit:
    return lambda doc: doc.pop(key)


NOT_JSON = "not a JSON document (RFC 8259): there is nothing for a schema to validate"
INTEGER = "JSON Schema's `integer` includes numbers with a zero fractional part (2.0)"
ORDER = "sort order is not expressible in JSON Schema"
RANGE = "reference indices must fall within items + external: a cross-field rule"
HASH_PART = "unique hash parts across items (and external paths) is a cross-element rule"
KEY_MATCH = "the chunk key must start with its own item's hash part: a cross-field rule"
OWN_STORE = "paths must be of the manifest's own store_dir: storePath allows both stores"
DUP_KEY = "duplicate object keys are invisible after parsing (RFC 8259 leaves them undefined)"
SCHEMA_GAP_PRINTABLE = (
    "schema gap: the reader refuses control and format characters in sigs and ca "
    "(str.isprintable), the schema's patterns do not (sigs: ^[^\\s]+$, ca: no pattern)")
SCHEMA_GAP_DRV = (
    "schema gap: the reader refuses derivation_outputs on an item whose path does not end in "
    ".drv; the schema could state it (if/then on prefixItems) but does not")
READER_ITEMS_INT = (
    "reader bug: `\"items\": 5` (or true, or 0) is read as an empty manifest because the "
    "parser stores a non-array `items` value and then only checks isinstance(..., int)")

# good documents
good("guix")
good("nix", base=NIX)
good("no-items", lambda d: d.update(items=[], external=[]))
good("name-null", set_top("name", None))
good("name-128-chars", set_top("name", "a" * 128))
good("name-all-classes", set_top("name", "A.b_c+d-9"))
good("tool-200-chars", set_top("tool", "t" * 200))
good("tool-unicode", set_top("tool", "incstore ✓ 0.1"))
good("tool-lone-surrogate", set_top("tool", "\ud800"))
good("nar-size-max", set_item("hello-2.12", NAR_SIZE, MAX_INT))
good("registration-time-zero", set_item("data", REG, 0))
good("seen-max", set_item("data", SEEN, MAX_INT))
good("extra-null", set_item("hello-2.12", EXTRA, None))
good("extra-upstream-narinfo", set_item("data", EXTRA, {"upstream_narinfo": True}))
good("sigs-16", set_item("data", EXTRA, {"sigs": [f"k-{n}:x" for n in range(16)]}))
good("sig-4096", set_item("data", EXTRA, {"sigs": ["k:" + "x" * 4094]}))
good("nix-ultimate-0", set_item("hello-2.12", EXTRA, {"ultimate": 0}), base=NIX)
good("nix-ca-1024", set_item("hello-2.12", EXTRA, {"ca": "c" * 1024}), base=NIX)
good("variant-key-52", set_item("data", KEY, _hash("data") + "." + "a" * 52))
good("variant-key-8", set_item("data", KEY, _hash("data") + "." + "a" * 8))
good("output-id-64", set_item("hello-2.12.drv", OUTPUTS, [["o" * 64, GUIX["items"][0][PATH]]]))
good("store-name-classes", lambda d: d["items"].__setitem__(
    _n(d, "data"), [_path("/gnu/store", "data")[:43] + "-a+b-c.d_e?f=g", *d["items"][
        _n(d, "data")][1:]]))
raw("pretty-printed", json.dumps(GUIX, indent=2).encode(), valid=True)
raw("items-before-header", json.dumps({"items": GUIX["items"], **{
    k: v for k, v in GUIX.items() if k != "items"}}).encode(), valid=True)
raw("whitespace-everywhere", b" \n\t" + json.dumps(GUIX, separators=(" , ", " : ")).encode()
    + b"\r\n", valid=True)

# the header
for field in ("format", "version", "flavour", "store_dir", "name", "created", "tool",
              "external", "items"):
    bad(f"missing-{field}", drop_top(field))
bad("unknown-top-field", set_top("signature", "x"))
bad("format-other", set_top("format", "nix-manifest"))
bad("version-1", set_top("version", 1))
bad("version-3", set_top("version", 3))
bad("version-string", set_top("version", "2"))
bad("version-true", set_top("version", True))
bad("version-null", set_top("version", None))
bad("version-2.5", set_top("version", 2.5))
bad("version-2.0", set_top("version", 2.0), reader_only=INTEGER)
bad("flavour-unknown", set_top("flavour", "gnu"))
bad("flavour-store-mismatch", set_top("store_dir", "/nix/store"))
bad("nix-with-gnu-store", set_top("store_dir", "/gnu/store"), base=NIX)
bad("name-empty", set_top("name", ""))
bad("name-dot-first", set_top("name", ".hidden"))
bad("name-slash", set_top("name", "a/b"))
bad("name-dotdot", set_top("name", ".."))
bad("name-space", set_top("name", "a b"))
bad("name-129-chars", set_top("name", "a" * 129))
bad("name-int", set_top("name", 5))
bad("name-final-newline", set_top("name", "main\n"))
bad("name-unicode", set_top("name", "mäin"))
bad("created-no-z", set_top("created", "2024-05-01T12:00:00"))
bad("created-int", set_top("created", 1700000000))
bad("created-final-newline", set_top("created", "2024-05-01T12:00:00Z\n"))
bad("tool-201-chars", set_top("tool", "t" * 201))
bad("tool-null", set_top("tool", None))
bad("external-object", set_top("external", {}))
bad("external-bad-path", set_top("external", ["/etc/passwd"]))
bad("external-repeated", lambda d: d.__setitem__("external", d["external"] * 2))
bad("external-unsorted", lambda d: d.__setitem__("external", [
    _path("/gnu/store", "zzz"), *d["external"]] if d["external"][0] < _path("/gnu/store", "zzz")
    else [*d["external"], _path("/gnu/store", "zzz")]), reader_only=ORDER)
bad("external-shares-hash-part", lambda d: d.__setitem__(
    "external", sorted([*d["external"], d["items"][0][PATH] + "-other"])), reader_only=HASH_PART)
bad("external-other-store", set_top("external", ["/nix/store/" + _hash("bash-5.2") + "-bash"]),
    reader_only=OWN_STORE)
bad("items-object", set_top("items", {}))
bad("items-null", set_top("items", None))
bad("items-string", set_top("items", "[]"))
bad("items-int", set_top("items", 5))
bad("items-true", set_top("items", True))
raw("items-twice", encode(GUIX)[:-1] + b',"items":[]}', reader_only=DUP_KEY)
raw("version-twice", b'{"version":2,' + encode(GUIX)[1:], reader_only=DUP_KEY)
raw("format-twice-nested", b'{"format":"x",' + encode(GUIX)[1:], reader_only=DUP_KEY)

# items: shape
bad("item-object", lambda d: d["items"].__setitem__(0, {"path": d["items"][0][PATH]}))
bad("item-11-fields", lambda d: d["items"][0].pop())
bad("item-13-fields", lambda d: d["items"][0].append(None))
bad("item-v1-chunk-object", lambda d: d["items"][0].__setitem__(KEY, {"key": d["items"][0][KEY]}))
# items: path
bad("path-outside-store", set_item("data", PATH, "/etc/" + _hash("data") + "-data"))
bad("path-dotdot", set_item("data", PATH, _path("/gnu/store", "data") + "/../../etc"))
bad("path-bad-hash-char", set_item("data", PATH, "/gnu/store/" + "e" * 32 + "-data"))
bad("path-upper-hash", set_item("data", PATH, "/gnu/store/" + _hash("data").upper() + "-data"))
bad("path-short-hash", set_item("data", PATH, "/gnu/store/" + _hash("data")[:31] + "-data"))
bad("path-name-dot-first", set_item("data", PATH, "/gnu/store/" + _hash("data") + "-.data"))
bad("path-name-212", set_item("data", PATH, "/gnu/store/" + _hash("data") + "-" + "d" * 212))
bad("path-name-slash", set_item("data", PATH, "/gnu/store/" + _hash("data") + "-a/b"))
bad("path-name-empty", set_item("data", PATH, "/gnu/store/" + _hash("data") + "-"))
bad("path-final-newline", set_item("data", PATH, _path("/gnu/store", "data") + "\n"))
bad("path-other-store", lambda d: d["items"].__setitem__(_n(d, "data"), [
    d["items"][_n(d, "data")][PATH].replace("/gnu/", "/nix/"), *d["items"][_n(d, "data")][1:]]),
    reader_only=OWN_STORE)
bad("path-int", set_item("data", PATH, 5))
# items: order and uniqueness
bad("items-unsorted", lambda d: d["items"].reverse(), reader_only=ORDER)
bad("item-twice", lambda d: d["items"].insert(0, copy.deepcopy(d["items"][0])),
    reader_only=ORDER)
bad("two-items-one-hash-part", lambda d: d["items"].insert(_n(d, "data") + 1, [
    d["items"][_n(d, "data")][PATH] + "-more", *d["items"][_n(d, "data")][1:]]),
    reader_only=HASH_PART)
bad("item-named-as-anothers-lock", lambda d: d["items"].insert(_n(d, "data") + 1, [
    d["items"][_n(d, "data")][PATH] + ".lock", *d["items"][_n(d, "data")][1:]]),
    reader_only=HASH_PART)
# items: hashes and sizes
bad("nar-hash-upper", set_item("data", NAR_HASH, "sha256:" + "A" * 64))
bad("nar-hash-63", set_item("data", NAR_HASH, "sha256:" + "a" * 63))
bad("nar-hash-md5", set_item("data", NAR_HASH, "md5:" + "a" * 32))
bad("nar-hash-nix32", set_item("data", NAR_HASH, "sha256:" + "a" * 52))
bad("nar-size-zero", set_item("data", NAR_SIZE, 0))
bad("nar-size-negative", set_item("data", NAR_SIZE, -1))
bad("nar-size-2^63", set_item("data", NAR_SIZE, 1 << 63))
raw("nar-size-5000-digits", encode(GUIX).replace(b",1234,", b"," + b"9" * 5000 + b",", 1))
bad("nar-size-string", set_item("data", NAR_SIZE, "5"))
bad("nar-size-float", set_item("data", NAR_SIZE, 1.5))
bad("nar-size-true", set_item("data", NAR_SIZE, True))
bad("nar-size-null", set_item("data", NAR_SIZE, None))
bad("nar-size-5.0", set_item("data", NAR_SIZE, 5.0), reader_only=INTEGER)
bad("registration-time-2^64", set_item("data", REG, 1 << 64))
bad("registration-time-negative", set_item("data", REG, -1))
bad("registration-time-float", set_item("data", REG, 1.5))
bad("chunk-size-zero", set_item("data", CSIZE, 0))
bad("chunk-size-2^63", set_item("data", CSIZE, 1 << 63))
bad("xxh3-31", set_item("data", XXH, "0" * 31))
bad("xxh3-upper", set_item("data", XXH, "A" * 32))
bad("seen-negative", set_item("data", SEEN, -1))
bad("seen-null", set_item("data", SEEN, None))
# items: references
bad("references-object", set_item("data", REFS, {}))
bad("references-negative", set_item("data", REFS, [-1]))
bad("references-string", set_item("data", REFS, ["0"]))
bad("references-float", set_item("data", REFS, [0.5]))
bad("references-2^63", set_item("data", REFS, [1 << 63]))
bad("references-repeated", set_item("data", REFS, [0, 0]))
bad("references-unsorted", set_item("hello-2.12", REFS, [1, 0]), reader_only=ORDER)
bad("references-out-of-range", set_item("data", REFS, [5]), reader_only=RANGE)
bad("references-huge-index", set_item("data", REFS, [MAX_INT]), reader_only=RANGE)
# items: deriver
bad("deriver-empty", set_item("data", DERIVER, ""))
bad("deriver-int", set_item("data", DERIVER, 5))
bad("deriver-outside-store", set_item("data", DERIVER, "/tmp/x.drv"))
bad("deriver-other-store", set_item("data", DERIVER, "/nix/store/" + _hash("d") + "-d.drv"),
    reader_only=OWN_STORE)
# items: derivation outputs
DRV_OUT = GUIX["items"][_n(GUIX, "hello-2.12")][PATH]
bad("outputs-object", set_item("hello-2.12.drv", OUTPUTS, {"out": DRV_OUT}))
bad("outputs-v1-objects", set_item("hello-2.12.drv", OUTPUTS, [{"id": "out", "path": DRV_OUT}]))
bad("outputs-one-element", set_item("hello-2.12.drv", OUTPUTS, [["out"]]))
bad("outputs-three-elements", set_item("hello-2.12.drv", OUTPUTS, [["out", DRV_OUT, "x"]]))
bad("outputs-id-space", set_item("hello-2.12.drv", OUTPUTS, [["o t", DRV_OUT]]))
bad("outputs-id-empty", set_item("hello-2.12.drv", OUTPUTS, [["", DRV_OUT]]))
bad("outputs-id-65", set_item("hello-2.12.drv", OUTPUTS, [["o" * 65, DRV_OUT]]))
bad("outputs-bad-path", set_item("hello-2.12.drv", OUTPUTS, [["out", "/etc/passwd"]]))
bad("outputs-repeated", set_item("hello-2.12.drv", OUTPUTS, [["out", DRV_OUT]] * 2))
bad("outputs-unsorted", set_item("hello-2.12.drv", OUTPUTS,
                                 [["out", DRV_OUT], ["doc", DRV_OUT]]), reader_only=ORDER)
bad("outputs-id-twice", set_item("hello-2.12.drv", OUTPUTS, [
    ["out", DRV_OUT], ["out", _path("/gnu/store", "other")]]),
    reader_only="unique output ids (not pairs) is a uniqueness-by-field rule")
bad("outputs-on-non-drv", set_item("data", OUTPUTS, [["out", DRV_OUT]]))
# items: chunk key
bad("key-upper", set_item("data", KEY, _hash("data").upper()))
bad("key-short", set_item("data", KEY, _hash("data")[:31]))
bad("key-path-traversal", set_item("data", KEY, "../../../etc/passwd"))
bad("key-variant-7", set_item("data", KEY, _hash("data") + "." + "a" * 7))
bad("key-variant-53", set_item("data", KEY, _hash("data") + "." + "a" * 53))
bad("key-of-another-item", set_item("data", KEY, _hash("glibc-2.39")), reader_only=KEY_MATCH)
# items: extra
bad("extra-empty", set_item("data", EXTRA, {}))
bad("extra-array", set_item("data", EXTRA, []))
bad("extra-string", set_item("data", EXTRA, "x"))
bad("extra-unknown-field", set_item("data", EXTRA, {"sigs": ["k:x"], "note": "x"}))
bad("extra-ultimate-on-guix", set_item("data", EXTRA, {"ultimate": 1}))
bad("extra-ca-on-guix", set_item("data", EXTRA, {"ca": "x"}))
bad("sigs-empty", set_item("data", EXTRA, {"sigs": []}))
bad("sigs-17", set_item("data", EXTRA, {"sigs": [f"k-{n}:x" for n in range(17)]}))
bad("sig-empty-string", set_item("data", EXTRA, {"sigs": [""]}))
bad("sig-space", set_item("data", EXTRA, {"sigs": ["k: x"]}))
bad("sig-newline", set_item("data", EXTRA, {"sigs": ["k:x\n"]}))
bad("sig-4097", set_item("data", EXTRA, {"sigs": ["k:" + "x" * 4095]}))
bad("sig-not-string", set_item("data", EXTRA, {"sigs": [5]}))
bad("sig-nul", set_item("data", EXTRA, {"sigs": ["k:x\x00y"]}))
bad("sig-soft-hyphen", set_item("data", EXTRA, {"sigs": ["k:x\u00ady"]}))
bad("upstream-narinfo-false", set_item("data", EXTRA, {"upstream_narinfo": False}))
bad("nix-ultimate-2", set_item("hello-2.12", EXTRA, {"ultimate": 2}), base=NIX)
bad("nix-ultimate-true", set_item("hello-2.12", EXTRA, {"ultimate": True}), base=NIX)
bad("nix-ca-1025", set_item("hello-2.12", EXTRA, {"ca": "c" * 1025}), base=NIX)
bad("nix-ca-int", set_item("hello-2.12", EXTRA, {"ca": 5}), base=NIX)
bad("nix-ca-newline", set_item("hello-2.12", EXTRA, {"ca": "fixed:\nforged"}), base=NIX)
raw("extra-key-twice", encode(GUIX).replace(
    b'{"sigs":["cache.example.org-1:c2lnbmF0dXJl"]}',
    b'{"sigs":["cache.example.org-1:c2lnbmF0dXJl"],"sigs":["cache.example.org-1:c2lnbmF0dXJl"]}'),
    reader_only=DUP_KEY)

# not JSON, or not a manifest at all
raw("empty-file", b"", reader_only=NOT_JSON)
raw("json-null", b"null")
raw("json-array", b"[]")
raw("json-empty-object", b"{}")
raw("not-utf8", encode(GUIX).replace(b'"incstore 0.1.0"', b'"incstore \xff"'),
    reader_only=NOT_JSON)
raw("utf8-bom", b"\xef\xbb\xbf" + encode(GUIX),
    reader_only=NOT_JSON + " (FORMAT.md: UTF-8 JSON; RFC 8259 forbids emitting a BOM)")
raw("utf16", json.dumps(GUIX).encode("utf-16"), reader_only=NOT_JSON)
raw("nan", encode(GUIX).replace(b"1700000001,null]", b"NaN,null]", 1), reader_only=NOT_JSON)
raw("infinity", encode(GUIX).replace(b"1700000001,null]", b"Infinity,null]", 1),
    reader_only=NOT_JSON)
raw("trailing-data", encode(GUIX) + b"x", reader_only=NOT_JSON)
raw("two-documents", encode(GUIX) + encode(GUIX), reader_only=NOT_JSON)
raw("truncated", encode(GUIX)[:-1], reader_only=NOT_JSON)
raw("nested-100000-deep", encode(GUIX)[:-1] + b',"tool":' + b"[" * 100_000 + b"]" * 100_000
    + b"}", reader_only=NOT_JSON + " (deeper than any recursive parser goes)")
raw("nested-100000-deep-in-item", encode(GUIX).replace(
    b"1700000001,null]", b"1700000001," + b"[" * 100_000 + b"]" * 100_000 + b"]", 1),
    reader_only=NOT_JSON + " (deeper than any recursive parser goes)")
raw("comment", b"// manifest\n" + encode(GUIX), reader_only=NOT_JSON)
raw("single-quotes", encode(GUIX).replace(b'"format"', b"'format'"), reader_only=NOT_JSON)


def _params(reader_only: bool) -> list[Any]:
    out = []
    for case in CASES:
        if (case.reader_only is not None) != reader_only:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def test_corpus_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    # every edit took effect: no two cases share their bytes
    assert len({c.data for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", _params(reader_only=False))
def test_schema_and_reader_agree(case: Case) -> None:
    schema, reader = schema_verdict(case.data), reader_verdict(case.data)
    assert schema is not None, "agree cases must be JSON documents"
    assert (schema, reader) == (case.valid, case.valid)


@pytest.mark.parametrize("case", _params(reader_only=True))
def test_reader_refuses_what_the_schema_cannot_state(case: Case) -> None:
    assert not case.valid
    assert not reader_verdict(case.data)
    # the rule really is beyond the schema: it accepts the parsed document, or there is none
    assert schema_verdict(case.data) in (True, None), case.reader_only


def _outcome(data: bytes, fast_path: bool) -> tuple[str, Any]:
    try:
        m = manifest._parse(data, "corpus", fast_path)
    except ManifestError as e:
        return ("refused", str(e))
    return ("accepted", (m.flavour, m.created, m.name, m.external, m.tool, m._c))


@pytest.mark.parametrize("case", _params(reader_only=False) + _params(reader_only=True))
def test_fast_path_and_generic_reader_agree(case: Case) -> None:
    """The reader takes items written as incstore writes them through one pattern; it must
    accept, refuse and report exactly what the item-by-item checks do."""
    fast = _outcome(case.data, True)
    assert fast == _outcome(case.data, False)
    if fast[0] == "accepted":  # the same document spelled with spaces takes the generic path
        assert _outcome(json.dumps(json.loads(case.data)).encode(), True) == fast


def test_real_save_manifest_is_in_the_corpus_language(tmp_path: Path) -> None:
    """What `save` writes is accepted by both (and the base cases are its canonical form)."""
    for doc in (GUIX, NIX):
        m = from_bytes(encode(doc), "base")
        assert from_bytes(m.to_bytes(), "again").same_content(m)
    src = make_sample(tmp_path / "src", items=3, seed=7)
    r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", tmp_path / "c",
            "--manifest", tmp_path / "m.json")
    assert r.code == 0, r.err
    data = (tmp_path / "m.json").read_bytes()
    assert schema_verdict(data) is True and reader_verdict(data) is True


# --- chunks without the zstd content checksum -------------------------------------------------


def _no_checksum_chunk(tmp_path: Path) -> tuple[Path, Path, str]:
    """A saved sample store whose first item's chunk is recompressed without the checksum flag
    (the manifest follows the new chunk's size and xxh3, so only the flag is wrong)."""
    src = make_sample(tmp_path / "src", items=3, seed=5)
    cache, manifest = tmp_path / "cache", tmp_path / "m.json"
    r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
            "--manifest", manifest)
    assert r.code == 0, r.err
    doc = load(manifest)
    item = doc["items"][0]
    chunk = cache / "nar" / f"{item['chunk']['key']}.nar.zst"
    nar = zstandard.ZstdDecompressor().decompressobj().decompress(chunk.read_bytes())
    data = zstandard.ZstdCompressor(write_checksum=False, write_content_size=False).compress(nar)
    assert not zstandard.get_frame_parameters(data).has_checksum
    chunk.chmod(0o644)
    chunk.write_bytes(data)
    item["chunk"]["size"], item["chunk"]["xxh3_128"] = len(data), xxhash.xxh3_128(data).hexdigest()
    dump(manifest, doc)
    return cache, manifest, item["path"]


def test_chunk_without_content_checksum_is_refused_by_restore(tmp_path: Path) -> None:
    cache, manifest, path = _no_checksum_chunk(tmp_path)
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", tmp_path / "dst")
    assert r.code == ChunkCorruptError.exit_code, r.err
    assert "Traceback" not in r.err
    assert [ln for ln in r.err.splitlines() if ln.startswith("incstore: error:")]
    assert path in r.err and "checksum" in r.err
    assert not (tmp_path / "dst" / path.lstrip("/")).exists()


def test_check_full_refuses_a_chunk_without_content_checksum(tmp_path: Path) -> None:
    cache, manifest, _ = _no_checksum_chunk(tmp_path)
    r = run("check", "--full", "--cache", cache, "--manifest", manifest)
    assert r.code == ChunkCorruptError.exit_code, (r.code, r.out, r.err)


# --- the windowed reader ----------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=6),
    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=10).filter(lambda k: k != "items"), _JSON,
                           max_size=6),
       window=st.sampled_from([1, 2, 3, 5, 8, 64]), chunk=st.sampled_from([1, 2, 7, 4096]),
       ascii_only=st.booleans(), spaced=st.booleans())
def test_windowed_values_read_as_json_reads_them(doc: dict[str, Any], window: int, chunk: int,
                                                 ascii_only: bool, spaced: bool) -> None:
    """The document is read a chunk at a time and values are decoded from windows of it: a
    value, a multi-byte character or a number cut by either edge must read exactly as the whole
    document does."""
    data = json.dumps(doc, ensure_ascii=ascii_only,
                      separators=(", ", ": ") if spaced else (",", ":")).encode()
    parser = _small_parser(data, window, chunk)
    assert parser.document(lambda raw: None) == json.loads(data)


def _small_parser(data: bytes, window: int, chunk: int) -> manifest._Parser:
    parser = manifest._Parser(io.BytesIO(data).read, "doc")
    parser.WINDOW = window
    parser.CHUNK = chunk
    parser.LOOKAHEAD = window
    return parser


@pytest.mark.parametrize("sizes", [(1, 1), (3, 2), (7, 5), (64, 300), (512, 4096)])
def test_the_corpus_reads_the_same_in_small_pieces(sizes: tuple[int, int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every corpus document, read in tiny chunks through tiny windows (so that every item
    straddles a refill), is accepted or refused exactly as with the default sizes."""
    expected = {c.id: _outcome(c.data, True) for c in CASES}
    window, chunk = sizes
    monkeypatch.setattr(manifest._Parser, "WINDOW", window)
    monkeypatch.setattr(manifest._Parser, "CHUNK", chunk)
    monkeypatch.setattr(manifest._Parser, "LOOKAHEAD", window)
    for case in CASES:
        assert _outcome(case.data, True) == expected[case.id], case.id


def test_a_character_that_is_not_utf8_is_refused_wherever_the_window_falls() -> None:
    good = json.dumps({"a": "x" * 50 + "é" + "y" * 50}, ensure_ascii=False).encode()
    bad = good.replace("é".encode(), b"\xc3\x28")
    for window in (1, 2, 7, 53, 54, 4096):
        p = _small_parser(good, window, window)
        assert p.document(lambda raw: None)["a"].count("é") == 1
        p = _small_parser(bad, window, window)
        with pytest.raises(ManifestError, match="not UTF-8"):
            p.document(lambda raw: None)
