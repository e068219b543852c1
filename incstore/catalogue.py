"""Catalogue: an SQLite database describing a chunk store, for people who ask questions of their
cache (`sqlite-utils`, Datasette, or plain `sqlite3`).

Tables (all written by `write`, one row per fact; times are UTC ISO-8601 strings):

- `manifests`: name, flavour, created (inside the document), saved (the file's mtime, the last
  save), items, nar_bytes, chunk_bytes, signed (a detached signature is stored beside it);
- `items`: path, name (the part after the hash, searchable), hash_part, nar_hash, nar_size,
  deriver, registration_time; one row per store path whatever the number of manifests naming it;
- `manifest_items`: manifest, path, chunk_key, chunk_size, seen: which manifests name which
  items (so which share them), and when each manifest's store last held the item;
- `refs`: referrer, reference (store paths; a reference may be an external path that is no
  item of any manifest);
- `chunks`: key, size, modified (mtime: written or last renewed), narinfo, upstream_narinfo
  (whether those files are there), quarantined (0; quarantined chunks get rows with 1);
- `unreadable_manifests`: name, problem.

`items_fts` is a full-text index on item names. The catalogue is built from the manifests
one at a time (a manifest's columns, never all of them at once) and written to a temporary
file renamed into place, so a reader never sees half a catalogue.

sqlite-utils is imported here only: no other command pays for it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from incstore import atomicfile
from incstore.chunkstore import ChunkStore
from incstore.errors import MissingDependencyError, StoreError
from incstore.manifest import Manifest
from incstore.named import read_named

BATCH = 2000


@dataclass
class CatalogueReport:
    path: Path
    manifests: int
    items: int
    chunks: int
    unreadable: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"catalogue": str(self.path), "manifests": self.manifests, "items": self.items,
                "chunks": self.chunks, "unreadable": self.unreadable}


def _iso(t: float) -> str:
    """ISO 8601 in UTC for any time FORMAT.md allows (a signed 64-bit count of seconds), the
    expanded year form (`+292277026596-12-04T15:30:07Z`) past 9999, where `time.gmtime`
    stops: one manifest with a far-future `seen` must not stop the whole catalogue."""
    days, rest = divmod(int(t), 86400)
    year, month, day = _civil_from_days(days)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    y = f"{year:04d}" if 0 <= year <= 9999 else f"{year:+05d}"
    return f"{y}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """The proleptic Gregorian date `days` after 1970-01-01 (H. Hinnant's civil_from_days),
    exact for any integer, unlike `datetime`, whose years end at 9999."""
    era, doe = divmod(days + 719468, 146097)
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _sqlite_utils() -> Any:
    try:
        import sqlite_utils
    except ImportError:
        raise MissingDependencyError(
            "the catalogue needs sqlite-utils: pip install 'incstore[catalogue]'") from None
    return sqlite_utils


def write(cache: str | Path, out: Path) -> CatalogueReport:
    """Write the catalogue of the chunk store at `cache` to `out` (replacing it)."""
    sqlite_utils = _sqlite_utils()
    chunks = ChunkStore(cache)
    if not chunks.exists():
        raise StoreError(f"{cache} holds no chunk store")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomicfile.temp_path_for(out)
    try:
        db = sqlite_utils.Database(tmp)
        try:
            report = _fill(db, chunks, out)
        finally:
            db.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        atomicfile.fsync_dir(out.parent)
    except OSError as e:
        raise StoreError(f"cannot write the catalogue: {e.strerror or e}", item=str(out)) \
            from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return report


def _fill(db: Any, chunks: ChunkStore, out: Path) -> CatalogueReport:
    db.execute("PRAGMA journal_mode = OFF")  # a temporary file renamed in only when complete
    db.execute("PRAGMA synchronous = OFF")
    _create(db)
    entries = chunks.manifests()  # one listing: names with their last save
    unreadable: list[str] = []
    read = 0
    with db.conn:
        for name in sorted(entries):
            named = read_named(chunks, [name])  # one manifest's columns at a time
            if name not in named.manifests:
                problem = ("a version-1 manifest (save again to write version 2)"
                           if name in named.legacy else
                           "written by a newer incstore" if name in named.newer else
                           named.invalid.get(name, "unreadable"))
                db["unreadable_manifests"].insert({"name": name, "problem": problem})
                unreadable.append(name)
                continue
            _add_manifest(db, chunks, name, named.manifests[name], entries[name].mtime)
            read += 1
            del named
        files = chunks.chunk_files()
        narinfos = chunks.narinfo_keys()
        upstream = chunks.upstream_keys()
        db["chunks"].insert_all(
            ({"key": key, "size": e.size, "modified": _iso(e.mtime),
              "narinfo": int(key in narinfos), "upstream_narinfo": int(key in upstream),
              "quarantined": 0} for key, e in sorted(files.items())), batch_size=BATCH)
        db["chunks"].insert_all(
            ({"key": e.name, "size": e.size, "modified": _iso(e.mtime), "narinfo": 0,
              "upstream_narinfo": 0, "quarantined": 1} for e in chunks.quarantined()),
            batch_size=BATCH)
    db["items"].enable_fts(["name"], create_triggers=False)
    db["manifest_items"].create_index(["path"])
    db["manifest_items"].create_index(["chunk_key"])
    db["refs"].create_index(["reference"])
    db["items"].create_index(["nar_size"])
    db.execute("ANALYZE")
    return CatalogueReport(out, read, db["items"].count, len(files), unreadable)


def _create(db: Any) -> None:
    db["manifests"].create({"name": str, "flavour": str, "created": str, "saved": str,
                            "items": int, "nar_bytes": int, "chunk_bytes": int,
                            "signed": int}, pk="name")
    db["items"].create({"path": str, "name": str, "hash_part": str, "nar_hash": str,
                        "nar_size": int, "deriver": str, "registration_time": int}, pk="path")
    db["manifest_items"].create({"manifest": str, "path": str, "chunk_key": str,
                                 "chunk_size": int, "seen": str},
                                pk=("manifest", "path"),
                                foreign_keys=[("manifest", "manifests", "name"),
                                              ("path", "items", "path")])
    db["refs"].create({"referrer": str, "reference": str}, pk=("referrer", "reference"))
    db["chunks"].create({"key": str, "size": int, "modified": str, "narinfo": int,
                         "upstream_narinfo": int, "quarantined": int}, pk="key")
    db["unreadable_manifests"].create({"name": str, "problem": str}, pk="name")


def _add_manifest(db: Any, chunks: ChunkStore, name: str, m: Manifest,
                  saved: float) -> None:
    count = len(m)
    cut = len(m.store_dir) + 1
    db["manifests"].insert({
        "name": name, "flavour": m.flavour.name, "created": m.created,
        "saved": _iso(saved), "items": count,
        "nar_bytes": sum(m.nar_size(n) for n in range(count)),
        "chunk_bytes": sum(m.chunk(n).size for n in range(count)),
        "signed": int(chunks.read_manifest_sig(name) is not None),
    })

    def items() -> Iterator[dict[str, Any]]:
        for n in range(count):
            path = m.paths[n]
            yield {"path": path, "name": path[cut + 33:], "hash_part": path[cut: cut + 32],
                   "nar_hash": m.nar_hash(n), "nar_size": m.nar_size(n),
                   "deriver": m.deriver(n), "registration_time": m.registration_time(n)}

    def members() -> Iterator[dict[str, Any]]:
        for n in range(count):
            chunk = m.chunk(n)
            yield {"manifest": name, "path": m.paths[n], "chunk_key": chunk.key,
                   "chunk_size": chunk.size, "seen": _iso(m.seen(n))}

    def references() -> Iterator[dict[str, Any]]:
        for n in range(count):
            for ref in m.references(n):
                yield {"referrer": m.paths[n], "reference": ref}

    # an item already catalogued from another manifest keeps its first row (same store path,
    # same content: the hash part says so)
    db["items"].insert_all(items(), batch_size=BATCH, ignore=True)
    db["manifest_items"].insert_all(members(), batch_size=BATCH)
    db["refs"].insert_all(references(), batch_size=BATCH, ignore=True)
