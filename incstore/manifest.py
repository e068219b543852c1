"""Manifest: the JSON record of one save, listing every item with what restoring it needs.

A manifest is the root of trust of a restore (schema/FORMAT.md, "Trust model"): chunks are
checked against it, never the reverse. `load` therefore validates everything a restore relies
on before anything is planned: the format version, every store path, closure (each reference is
an item), chunk keys, hash syntax. The JSON Schema in schema/manifest.schema.json describes the
same document; tests validate every manifest written against it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from incstore import __version__, atomicfile
from incstore.chunkstore import check_key
from incstore.db import FLAVOURS, Flavour, PathInfo
from incstore.errors import ChunkStoreError, ManifestError
from incstore.storepath import StorePath

FORMAT = "incstore-manifest"
VERSION = 1
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_XXH_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class ChunkRef:
    """Where an item's chunk is and how to check it without decompressing it."""

    key: str
    size: int
    xxh3_128: str


@dataclass(frozen=True)
class Item:
    info: PathInfo
    chunk: ChunkRef

    @property
    def path(self) -> str:
        return self.info.path


@dataclass(frozen=True)
class Manifest:
    flavour: Flavour
    items: tuple[Item, ...]
    created: str = ""
    # references that are not items: paths the target store must already have valid (a save
    # with --exclude-db leaves out what, e.g., the Guix binary tarball's own DB holds)
    external: tuple[str, ...] = ()

    @property
    def store_dir(self) -> str:
        return self.flavour.store_dir

    def by_path(self) -> dict[str, Item]:
        return {item.path: item for item in self.items}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "flavour": self.flavour.name,
            "store_dir": self.store_dir,
            "created": self.created,
            "tool": f"incstore {__version__}",
            "items": [_item_json(item, self.flavour) for item in self.items],
            "external": list(self.external),
        }

    def same_content(self, other: Manifest) -> bool:
        """Equal but for when and by what they were written."""
        mine, theirs = self.to_json(), other.to_json()
        for doc in (mine, theirs):
            doc.pop("created")
            doc.pop("tool")
        return mine == theirs

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode()

    def write(self, path: Path) -> None:
        atomicfile.write_bytes(path, self.to_bytes())


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _item_json(item: Item, flavour: Flavour) -> dict[str, Any]:
    info = item.info
    doc: dict[str, Any] = {
        "path": info.path,
        "nar_hash": info.hash,
        "nar_size": info.nar_size,
        "references": list(info.references),
        "deriver": info.deriver,
        "registration_time": info.registration_time,
        "derivation_outputs": [{"id": i, "path": p} for i, p in info.derivation_outputs],
        "chunk": {"key": item.chunk.key, "size": item.chunk.size, "xxh3_128": item.chunk.xxh3_128},
    }
    if flavour.extra_columns:
        doc["nix"] = {c: getattr(info, c) for c in flavour.extra_columns}
    return doc


def _expect(cond: bool, message: str, item: str | None = None) -> None:
    if not cond:
        raise ManifestError(message, item=item)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_item(raw: object, flavour: Flavour) -> Item:
    _expect(isinstance(raw, dict), "manifest item is not an object")
    assert isinstance(raw, dict)
    path = raw.get("path")
    _expect(isinstance(path, str), "manifest item has no path")
    assert isinstance(path, str)
    sp = StorePath.parse(path, flavour.store_dir)
    nar_hash = raw.get("nar_hash")
    _expect(isinstance(nar_hash, str) and bool(_HASH_RE.fullmatch(nar_hash)), "bad nar_hash", path)
    _expect(_is_int(raw.get("nar_size")) and raw["nar_size"] > 0, "bad nar_size", path)
    _expect(_is_int(raw.get("registration_time")), "bad registration_time", path)
    refs = raw.get("references")
    refs_ok = isinstance(refs, list) and all(isinstance(r, str) for r in refs)
    _expect(refs_ok, "bad references", path)
    assert isinstance(refs, list)
    for ref in refs:
        StorePath.parse(ref, flavour.store_dir)
    deriver = raw.get("deriver")
    _expect(deriver is None or isinstance(deriver, str), "bad deriver", path)
    if deriver is not None:
        StorePath.parse(deriver, flavour.store_dir)
    outputs = raw.get("derivation_outputs", [])
    _expect(isinstance(outputs, list), "bad derivation_outputs", path)
    parsed_outputs: list[tuple[str, str]] = []
    for out in outputs:
        _expect(
            isinstance(out, dict) and isinstance(out.get("id"), str)
            and isinstance(out.get("path"), str),
            "bad derivation_outputs entry",
            path,
        )
        StorePath.parse(out["path"], flavour.store_dir)
        parsed_outputs.append((out["id"], out["path"]))
    chunk = raw.get("chunk")
    _expect(isinstance(chunk, dict), "item has no chunk", path)
    assert isinstance(chunk, dict)
    key = chunk.get("key")
    try:
        check_key(key if isinstance(key, str) else "")
    except ChunkStoreError as e:
        raise ManifestError(str(e), item=path) from e
    assert isinstance(key, str)
    _expect(key.split(".")[0] == sp.hash_part, "chunk key does not match the store path", path)
    _expect(_is_int(chunk.get("size")), "bad chunk size", path)
    xxh = chunk.get("xxh3_128")
    _expect(isinstance(xxh, str) and bool(_XXH_RE.fullmatch(xxh)), "bad chunk xxh3_128", path)
    assert isinstance(xxh, str)
    nix: dict[str, Any] = {}
    if flavour.extra_columns:
        raw_nix = raw.get("nix", {})
        _expect(isinstance(raw_nix, dict), "bad nix fields", path)
        nix = {c: raw_nix.get(c) for c in flavour.extra_columns}
        _expect(nix["ultimate"] is None or _is_int(nix["ultimate"]), "bad ultimate", path)
        strings_ok = all(nix[c] is None or isinstance(nix[c], str) for c in ("sigs", "ca"))
        _expect(strings_ok, "bad sigs or ca", path)
    info = PathInfo(
        path=path,
        hash=nar_hash,  # type: ignore[arg-type]
        nar_size=raw["nar_size"],
        registration_time=raw["registration_time"],
        deriver=deriver,
        references=tuple(sorted(refs)),
        derivation_outputs=tuple(sorted(parsed_outputs)),
        **nix,
    )
    return Item(info, ChunkRef(key, chunk["size"], xxh))


def parse(doc: object, source: str) -> Manifest:
    _expect(isinstance(doc, dict), "not a manifest (not a JSON object)", source)
    assert isinstance(doc, dict)
    _expect(doc.get("format") == FORMAT, "not an incstore manifest", source)
    _expect(
        doc.get("version") == VERSION,
        f"unknown manifest version {doc.get('version')!r} (this incstore reads {VERSION})",
        source,
    )
    flavour = FLAVOURS.get(str(doc.get("flavour")))
    _expect(flavour is not None, f"unknown flavour {doc.get('flavour')!r}", source)
    assert flavour is not None
    _expect(doc.get("store_dir") == flavour.store_dir,
            f"store_dir {doc.get('store_dir')!r} is not {flavour.store_dir}", source)
    raw_items = doc.get("items")
    _expect(isinstance(raw_items, list), "manifest has no items list", source)
    assert isinstance(raw_items, list)
    items = tuple(_parse_item(raw, flavour) for raw in raw_items)
    paths = {item.path for item in items}
    _expect(len(paths) == len(items), "manifest lists a path twice", source)
    external = doc.get("external", [])
    _expect(isinstance(external, list) and all(isinstance(p, str) for p in external),
            "bad external list", source)
    for path in external:
        StorePath.parse(path, flavour.store_dir)
    known = paths | set(external)
    for item in items:
        for ref in item.info.references:
            _expect(ref in known, f"reference {ref} is not in the manifest (not closed)",
                    item.path)
    created = doc.get("created", "")
    return Manifest(flavour, tuple(sorted(items, key=lambda i: i.path)), str(created),
                    tuple(sorted(external)))


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_name(name: str) -> str:
    """A manifest name is used as a file name in the chunk store: keep it to a safe alphabet."""
    if not NAME_RE.fullmatch(name):
        raise ManifestError(f"invalid manifest name {name!r} (letters, digits, . _ + -)")
    return name


def from_bytes(text: bytes, source: str) -> Manifest:
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"invalid JSON ({e})", item=source) from e
    return parse(doc, source)


def load(path: Path) -> Manifest:
    try:
        text = path.read_bytes()
    except FileNotFoundError as e:
        raise ManifestError("no such manifest", item=str(path)) from e
    return from_bytes(text, str(path))
