"""Transfer: how a local chunk store travels through GitHub's cache (actions/cache) as content
entries named by an index entry, uploading only what is new, correct whatever the cache
service grants.

GitHub's cache refuses reservations (a 429 past ~200 uploads a minute, a quota, 5xx that
outlast the client's retries) exactly as it refuses a key another job holds, keeps a
cancelled job's reservation for up to a day, and shows an entry only once its upload is
finalized. So no key is ever contended for, and a restore learns which entries exist only
from an entry written after they were finalized:

- every key is unique to one save (a UTC time stamp and a random part, fixed width, so no
  key is a prefix of another);
- a save uploads a **content entry** `F-c-NS-<unique>` (the chunk store's blobs it created or
  changed since its restore, and the names gc deleted; or, every COMPACT_AT saves, all of
  them: a base), looks its key up to see it finalized, and only then uploads an **index
  entry** `F-i-NS-<unique>` naming the whole chain of content entries a restore needs;
- a restore takes the newest index (`restore-keys` prefix `F-i-NS-`, then `F-i-` for any
  namespace of the same family) and then each content entry of its chain by exact key.

F is the family: the format version, the runner's OS and CPU architecture, and the store
flavour (`FAMILY`); NS the user's namespace (the `key-prefix` input). Nothing else goes into
a key: the chunk store is content-addressed, so a Guix upgrade needs no new key.

Each entry is a directory of the transfer directory named by its key, holding its blobs
under their chunk-store names and a record: `<key>/record.json` for content,
`<key>/index.json` for an index. Entries never overlay each other there.

Invariant: every item of a finished save (one whose index was taken) is seen by every later
restore in that scope until GitHub evicts its entries. A refused or held reservation costs
that save's own upload only (nothing names an entry that was not finalized; the next save's
delta, made against what it restored, carries the same blobs again). Two saves whose index
uploads overlap can lose to each other: each save reads the newest index before writing its
own and again after, and takes in any chain it did not see (`next_chain`), so only a save
whose check ran while the other's index was still uploading loses; its content entry is then
named by no index, and its next run, which restores without it, saves those items again.

Two content entries of one chain that did not see each other (concurrent saves) are merged
as siblings (`merge_chain`): a manifest both wrote becomes the union of the two, and one
entry's gc deletions never remove what the other wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incstore import atomicfile
from incstore.backend import LocalBackend, valid_name
from incstore.errors import ChunkStoreError, IncstoreError
from incstore.xferdir import MAX_RECORD_BYTES, Refusal, TransferDir

FORMAT = "incstore-cache-entry"
INDEX_FORMAT = "incstore-cache-index"
VERSION = 2
RECORD = "record.json"
INDEX = "index.json"
MAX_CHAIN = 20  # content entries a restore reads: the actions' restore steps
COMPACT_AT = 12  # a save that restored this many content entries uploads a base instead
_NEVER = ("manifests/pending/", "quarantine/")
_KEY_RE = re.compile(r"[A-Za-z0-9._+-]+-[ci]-[A-Za-z0-9._+-]+-[0-9]{14}-[0-9a-f]{12}")
_PART_RE = re.compile(r"[A-Za-z0-9._+]+")
_NS_RE = re.compile(r"[A-Za-z0-9._+-]{1,100}")


def family(os_name: str, arch: str, flavour: str) -> str:
    """The part of every key that must change when entries become unusable to a reader: the
    entry format, the OS and CPU architecture (store items are binaries) and the flavour
    (the store directory)."""
    parts = [os_name.lower(), arch.lower(), flavour]
    if not all(_PART_RE.fullmatch(p) for p in parts):
        raise ValueError(f"not a key component: {parts}")
    return f"incstore-x{VERSION}-" + "-".join(parts)


def check_namespace(ns: str) -> str:
    if not _NS_RE.fullmatch(ns):
        raise ValueError(f"key-prefix: letters, digits and . _ + - only, not {ns!r}")
    return ns


def unique(seed: str, now: float | None = None) -> str:
    """A key suffix no other save makes: the UTC time (so that keys sort by age too) and 48
    random bits mixed with `seed` (the run, attempt and job)."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{hashlib.sha256(seed.encode() + os.urandom(16)).hexdigest()[:12]}"


def content_key(fam: str, ns: str, suffix: str) -> str:
    return f"{fam}-c-{ns}-{suffix}"


def index_key(fam: str, ns: str, suffix: str) -> str:
    return f"{fam}-i-{ns}-{suffix}"


def index_lookup(fam: str, ns: str) -> tuple[str, str]:
    """The index lookup: (primary key prefix, restore-keys fallback prefix)."""
    return f"{fam}-i-{ns}-", f"{fam}-i-"


def is_key(text: str) -> bool:
    return bool(_KEY_RE.fullmatch(text)) and len(text) <= 512


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


def everything(root: Path) -> Delta:
    """The whole chunk store, as a base entry carries it."""
    now = dict(_walk(root))
    return Delta(sorted(now), [], sum(st.st_size for st in now.values()))


# records --------------------------------------------------------------------------------


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} is not a list of strings")
    return value


@dataclass
class Content:
    """A content entry's record: its blobs, the names it deleted, and the chain of content
    entries the save that made it had restored (its `parents`: what it saw)."""

    key: str
    kind: str  # "base" (every blob of the chunk store) or "delta"
    parents: list[str]
    files: list[str]
    deleted: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "key": self.key, "kind": self.kind,
                "parents": self.parents, "files": self.files, "deleted": self.deleted}

    @classmethod
    def parse(cls, data: bytes, key: str) -> Content:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or \
                    doc.get("version") != VERSION:
                raise ValueError("not an incstore content entry of this version")
            entry = cls(doc["key"], doc["kind"], _strings(doc["parents"], "parents"),
                        _strings(doc["files"], "files"), _strings(doc["deleted"], "deleted"))
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise ChunkStoreError(f"unreadable content entry record: {e}", item=key) from None
        if entry.key != key or entry.kind not in ("base", "delta") or \
                not all(is_key(k) for k in entry.parents) or \
                not all(travels(n) for n in entry.files + entry.deleted):
            raise ChunkStoreError("content entry record does not hold to the format",
                                  item=key)
        return entry


@dataclass
class Index:
    """An index entry's record: the content entries a restore reads, oldest first."""

    key: str
    chain: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "version": VERSION, "key": self.key,
                "chain": self.chain}

    @classmethod
    def parse(cls, data: bytes, key: str) -> Index:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT or \
                    doc.get("version") != VERSION:
                raise ValueError("not an incstore cache index of this version")
            index = cls(doc["key"], _strings(doc["chain"], "chain"))
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise ChunkStoreError(f"unreadable cache index: {e}", item=key) from None
        if index.key != key or not all(is_key(k) for k in index.chain) or \
                len(index.chain) > MAX_CHAIN or len(set(index.chain)) != len(index.chain):
            raise ChunkStoreError("cache index does not hold to the format", item=key)
        return index


def _record(xfer: Path, key: str, name: str, missing: str) -> bytes:
    """The record `name` of the entry restored into the transfer directory under `key`,
    as bounded bytes (ChunkStoreError, saying `missing`, if it is not there)."""
    if not is_key(key):
        raise ChunkStoreError("not a cache entry key", item=key)
    try:
        return TransferDir(xfer).read(f"{key}/{name}", MAX_RECORD_BYTES)
    except FileNotFoundError:
        raise ChunkStoreError(missing, item=key) from None
    except Refusal as e:
        raise ChunkStoreError(str(e), item=key) from None


def read_index(xfer: Path, key: str) -> Index:
    return Index.parse(_record(xfer, key, INDEX, "the cache entry holds no index"), key)


def read_content(xfer: Path, key: str) -> Content:
    return Content.parse(_record(xfer, key, RECORD, "not restored (missing or evicted)"), key)


# policy ---------------------------------------------------------------------------------


def is_base_due(restored: list[str]) -> bool:
    """Whether the next upload is a base: when nothing was restored, or the chain is long."""
    return not restored or len(restored) >= COMPACT_AT


def next_chain(restored: list[str], own: str, *, base: bool,
               newest: Iterable[str] = ()) -> list[str] | None:
    """The chain an index names after this save: what it restored (or, for a base, only the
    base, which holds it all) and its own entry, then whatever the newest index names that
    this save did not see (a concurrent save's entries). None if that is longer than a
    restore reads (this save then loses; see the module docstring)."""
    ours = [own] if base else [*restored, own]
    chain = ours + [k for k in newest if k not in ours and k not in restored]
    return chain if len(chain) <= MAX_CHAIN else None


# merging --------------------------------------------------------------------------------


@dataclass
class Merged:
    """What `merge_chain` applied, what it could not read, and what it refused (each a
    warning: a cache miss for what it held)."""

    applied: list[str]
    missing: list[str]
    problems: list[str]
    unions: list[str] = field(default_factory=list)  # manifests two siblings wrote


def _is_manifest(name: str) -> bool:
    return name.startswith("manifests/") and name.endswith(".json") and name.count("/") == 1


def merge_chain(xfer: Path, root: Path, chain: list[str]) -> Merged:
    """Apply the content entries of `chain` restored into `xfer` to the chunk store at
    `root`, oldest first: each blob from the last entry that wrote it, each deletion unless
    a sibling (an entry the deleting save had not seen) wrote the name, and a manifest two
    siblings wrote as the union of their items. The transfer directory is emptied."""
    records: dict[str, Content] = {}
    missing: list[str] = []
    problems: list[str] = []
    for key in chain:
        try:
            records[key] = read_content(xfer, key)
        except ChunkStoreError as e:
            missing.append(key)
            if "missing or evicted" not in str(e):
                problems.append(str(e))
    writer: dict[str, str] = {}
    present: dict[str, bool] = {}
    siblings: dict[str, list[str]] = {}
    for key in (k for k in chain if k in records):
        entry = records[key]
        seen = set(entry.parents)
        for name in entry.deleted:
            if writer.get(name, key) in seen or name not in writer:
                present[name] = False
                writer[name] = key
        for name in entry.files:
            before = writer.get(name)
            if _is_manifest(name) and present.get(name) and before is not None and \
                    before not in seen:
                siblings.setdefault(name, []).append(before)
            present[name] = True
            writer[name] = key
    source = TransferDir(xfer)
    chunks = LocalBackend(root)
    try:
        for name, keep in sorted(present.items()):
            try:
                if keep:
                    source.move_into(f"{writer[name]}/{name}", chunks, name)
                else:
                    chunks.delete(name)
            except (Refusal, ChunkStoreError) as e:
                problems.append(str(e))
            except OSError as e:
                problems.append(f"{name}: {e.strerror or e}")
        unions = []
        for name, others in sorted(siblings.items()):
            if union_manifest(chunks, name, [_sibling(source, f"{k}/{name}") for k in others]):
                unions.append(name)
    finally:
        chunks.close()
    clear(xfer)
    return Merged([k for k in chain if k in records], missing, problems, unions)


def _sibling(source: TransferDir, name: str) -> bytes | None:
    from incstore.manifest import MAX_BYTES

    try:
        return source.read(name, MAX_BYTES)
    except (OSError, Refusal):
        return None


def union_manifest(chunks: LocalBackend, name: str, others: list[bytes | None]) -> bool:
    """Make the manifest `name` of the chunk store hold every item of `others` too (the
    versions concurrent saves wrote; the chunk store's own wins for an item both list).
    Its detached signature no longer covers it and goes (a restore then relies on the
    items' own signatures, and the next signed save signs it again)."""
    from incstore.manifest import Manifest, from_bytes, now_utc

    label = name.removeprefix("manifests/").removesuffix(".json")
    try:
        ours = from_bytes(chunks.read(name), label)
    except (OSError, IncstoreError):
        return False
    items = {}
    external = set(ours.external)
    for data in others:
        if data is None:
            continue
        try:
            theirs = from_bytes(data, label)
        except IncstoreError:
            continue
        if theirs.flavour.name != ours.flavour.name:
            continue
        items.update({i.path: i for i in theirs.items})
        external |= set(theirs.external)
    if not set(items) - set(ours.paths):
        return False
    items.update({i.path: i for i in ours.items})
    external -= set(items)
    union = Manifest.from_items(ours.flavour, items.values(), created=now_utc(),
                                name=ours.name, external=external)
    chunks.write(name, union.to_bytes())
    chunks.delete(name + ".sig")
    return True


# the transfer directory's own writes -------------------------------------------------------


def clear(xfer: Path) -> None:
    """Empty the transfer directory (keeping the directory itself, owned by its user)."""
    TransferDir(xfer).clear()


def stage_content(root: Path, xfer: Path, entry: Content) -> int:
    """Put `entry`'s files (hard links, or copies across file systems) and record into the
    empty transfer directory, under the entry's key; return the bytes staged."""
    clear(xfer)
    top = xfer / entry.key
    total = 0
    for name in entry.files:
        src, dst = root / name, top / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copyfile(src, dst, follow_symlinks=False)
        total += dst.stat().st_size
    top.mkdir(parents=True, exist_ok=True)
    (top / RECORD).write_text(json.dumps(entry.to_json(), sort_keys=True))
    return total


def stage_index(xfer: Path, index: Index) -> None:
    clear(xfer)
    (xfer / index.key).mkdir(parents=True)
    (xfer / index.key / INDEX).write_text(json.dumps(index.to_json(), sort_keys=True))


def give_to(xfer: Path, uid: int, gid: int) -> None:
    """Hand the transfer directory to the runner's user, who runs actions/cache."""
    for dirpath, dirnames, filenames in os.walk(xfer):
        for name in [*dirnames, *filenames]:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(dirpath, name), uid, gid)
    os.lchown(xfer, uid, gid)
