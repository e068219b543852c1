"""Transfer: how a local chunk store travels through an immutable key-value cache (GitHub's
actions/cache) as a base entry plus small delta entries, uploading only what is new.

A cache entry is a directory tree (the transfer directory) holding some of the chunk store's
blobs under their own names plus one entry record, `.incstore-entries/<key>.json`:

    {"format": "incstore-cache-entry", "version": 1, "kind": "base" | "slot",
     "generation": G, "slot": S, "nonce": "...", "files": [...], "deleted": [...]}

Keys, for a prefix P (the user's key prefix and the runner's OS):
- `P-base-gGGGGGG`: generation G's base, the whole chunk store when it was compacted. A
  restore takes the newest base (a prefix match on `P-base-`).
- `P-gGGGGGG-sSS`: the S-th delta of generation G (S from 01 to SLOTS). Entries are
  immutable, so a key is taken by the first writer: a save claims the next free slot by
  saving under its key, then reads the entry back and compares its nonce; a save that lost
  the race merges the winner's entry and tries the next slot. Concurrent saves (matrix jobs,
  workflows pushed together) therefore never overwrite each other, and a restore reads the
  slots in order until the first missing one.
- When the slots of generation G are full, a save first writes generation G+1's base, which
  holds exactly generation G's content (base and slots, minus what they deleted): two saves
  compacting at once write identical bases, so either may win. Its own changes then go to
  the new generation's first slot, as above.

A delta holds the blobs the save created or changed (chunks, narinfos, manifests and their
signatures, upstream narinfos) and names the blobs it deleted (gc); a restore applies the
entries in order. `manifests/pending/`, `quarantine/` and temporary files never travel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incstore import atomicfile
from incstore.backend import LocalBackend, valid_name
from incstore.errors import ChunkStoreError
from incstore.xferdir import Refusal, TransferDir

FORMAT = "incstore-cache-entry"
VERSION = 1
ENTRY_DIR = ".incstore-entries"
SLOTS = 16
_NEVER = ("manifests/pending/", "quarantine/", ".incstore-entries/")
_GEN_RE = re.compile(r"-base-g([0-9]{6})$")


def base_key(prefix: str, generation: int) -> str:
    return f"{prefix}-base-g{generation:06d}"


def slot_key(prefix: str, generation: int, slot: int) -> str:
    return f"{prefix}-g{generation:06d}-s{slot:02d}"


def slot_prefix(prefix: str, generation: int) -> str:
    return f"{prefix}-g{generation:06d}-s"


def generation_of(key: str) -> int | None:
    m = _GEN_RE.search(key)
    return int(m.group(1)) if m else None


def travels(name: str) -> bool:
    """Whether a chunk-store blob belongs in a cache entry."""
    base = name.rsplit("/", 1)[-1]
    return (valid_name(name) and not name.startswith(_NEVER)
            and not atomicfile.is_temp_name(base))


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular file under `root` that travels, with its lstat (no symlink followed)."""
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(root / rel if rel else root))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                if travels(name + "/x"):
                    stack.append(name)
            elif e.is_file(follow_symlinks=False) and travels(name):
                with contextlib.suppress(FileNotFoundError):
                    yield name, e.stat(follow_symlinks=False)


SMALL = 1 << 20


def _ident(path: Path, st: os.stat_result) -> str:
    """What tells that a file changed since a snapshot. Small files (narinfos, manifests) are
    told by their content: a save rewrites an unchanged manifest byte for byte. A chunk is
    write-once under its key, so its inode and size tell (a save renewing its mtime is not a
    change)."""
    if st.st_size < SMALL:
        with contextlib.suppress(OSError):
            return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}"


@dataclass
class Snapshot:
    """The chunk store's files as a restore left them: name -> identity."""

    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def take(cls, root: Path) -> Snapshot:
        return cls({name: _ident(root / name, st) for name, st in _walk(root)})

    def write(self, path: Path) -> None:
        atomicfile.write_bytes(path, json.dumps(self.files, sort_keys=True).encode())

    @classmethod
    def read(cls, path: Path) -> Snapshot:
        return cls(json.loads(path.read_bytes()))


@dataclass
class Delta:
    """What changed in a chunk store since a snapshot."""

    changed: list[str]
    deleted: list[str]
    bytes: int

    def __bool__(self) -> bool:
        return bool(self.changed or self.deleted)


def delta(root: Path, since: Snapshot) -> Delta:
    now = {name: st for name, st in _walk(root)}
    changed = sorted(n for n, st in now.items() if since.files.get(n) != _ident(root / n, st))
    deleted = sorted(n for n in since.files if n not in now)
    return Delta(changed, deleted, sum(now[n].st_size for n in changed))


@dataclass
class Entry:
    """One cache entry's record."""

    key: str
    kind: str
    generation: int
    slot: int
    nonce: str
    files: list[str]
    deleted: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "key": self.key, "kind": self.kind,
                "generation": self.generation, "slot": self.slot, "nonce": self.nonce,
                "files": self.files, "deleted": self.deleted}

    @classmethod
    def parse(cls, data: bytes) -> Entry:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ValueError("not an incstore cache entry of this version")
            entry = cls(str(doc["key"]), str(doc["kind"]), int(doc["generation"]),
                        int(doc["slot"]), str(doc["nonce"]),
                        [str(n) for n in doc["files"]], [str(n) for n in doc["deleted"]])
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise ChunkStoreError(f"unreadable cache entry record: {e}") from None
        if entry.kind not in ("base", "slot") or not all(
                travels(n) for n in entry.files + entry.deleted):
            raise ChunkStoreError("cache entry record names a blob that cannot travel",
                                  item=entry.key)
        return entry


def read_entries(xfer: Path) -> tuple[list[Entry], list[str]]:
    """The records of the entries restored into the transfer directory, in order (base,
    then slots), and the problems of those refused: a record that is not a bounded regular
    file under its key's name, or does not parse, is left out (its files are then not
    trusted to overlay anything)."""
    raw, problems = TransferDir(xfer).records(ENTRY_DIR)
    found = []
    for key, data in raw.items():
        try:
            entry = Entry.parse(data)
        except ChunkStoreError as e:
            problems.append(f"{ENTRY_DIR}/{key}.json: {e}")
            continue
        if entry.key != key:
            problems.append(f"{ENTRY_DIR}/{key}.json: records the key {entry.key!r}")
            continue
        found.append(entry)
    return sorted(found, key=lambda e: (e.generation, e.kind != "base", e.slot)), problems


def entries_in(xfer: Path) -> list[Entry]:
    return read_entries(xfer)[0]


@dataclass
class Merged:
    """What `merge` applied, and what it refused (each refusal a warning: a cache miss)."""

    entries: list[Entry]
    problems: list[str]


def merge(xfer: Path, root: Path, *, generation: int | None = None) -> Merged:
    """Apply the entries restored into `xfer` to the chunk store at `root`: each entry's
    files overlay, its deletions apply, in entry order (only entries of `generation`, when
    given). Only regular files inside the transfer directory move (see `xferdir`). The
    transfer directory is emptied."""
    found, problems = read_entries(xfer)
    entries = [e for e in found if generation is None or e.generation == generation]
    present: dict[str, bool] = {}
    for entry in entries:
        present.update({n: False for n in entry.deleted})
        present.update({n: True for n in entry.files})
    source = TransferDir(xfer)
    chunks = LocalBackend(root)
    try:
        for name, keep in sorted(present.items()):
            try:
                if keep:
                    source.move_into(name, chunks)
                else:
                    chunks.delete(name)
            except (Refusal, ChunkStoreError) as e:
                problems.append(str(e))
            except OSError as e:
                problems.append(f"{name}: {e.strerror or e}")
    finally:
        chunks.close()
    clear(xfer)
    return Merged(entries, problems)


def clear(xfer: Path) -> None:
    """Empty the transfer directory (keeping the directory itself, owned by its user)."""
    TransferDir(xfer).clear()


def stage(root: Path, xfer: Path, entry: Entry) -> int:
    """Put `entry`'s files (hard links, or copies across file systems) and record into the
    empty transfer directory; return the bytes staged."""
    clear(xfer)
    total = 0
    for name in entry.files:
        src, dst = root / name, xfer / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copyfile(src, dst)
        total += dst.stat().st_size
    record = xfer / ENTRY_DIR / f"{entry.key}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(entry.to_json(), sort_keys=True))
    return total


def mirror(root: Path, dest: Path) -> None:
    """Keep the chunk store's current content at `dest` as hard links (copies across file
    systems): every later write in the chunk store is a new file renamed into place, so the
    mirror keeps what was there."""
    if dest.exists():
        shutil.rmtree(dest)
    for name, _ in _walk(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(root / name, target, follow_symlinks=False)
        except OSError:
            shutil.copyfile(root / name, target)


def owns(xfer: Path, key: str, nonce: str) -> bool:
    """Whether the entry restored into `xfer` under `key` is the one with our nonce."""
    return any(e.key == key and e.nonce == nonce for e in entries_in(xfer))


def give_to(xfer: Path, uid: int, gid: int) -> None:
    """Hand the transfer directory to the runner's user, who runs actions/cache."""
    for dirpath, dirnames, filenames in os.walk(xfer):
        for name in [*dirnames, *filenames]:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(dirpath, name), uid, gid)
    os.lchown(xfer, uid, gid)


def new_nonce() -> str:
    return hashlib.sha256(os.urandom(32)).hexdigest()[:24]

