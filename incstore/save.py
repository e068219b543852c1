"""Save: the verb that writes a store's valid paths into a chunk store and a manifest.

`plan_save` reads the daemon DB (one snapshot) and the chunk store's listing and decides, per
item, whether its chunk must be written or is already there; it touches nothing. `execute_save`
serialises each new item to NAR, checks the NAR's sha256 against the DB, compresses it into the
chunk store, and writes the manifest last, so a manifest never names a chunk that is not there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import xxhash
import zstandard

from incstore import atomicfile, db, nar
from incstore.atomicfile import AlreadyExists
from incstore.chunkstore import ChunkStore, NarInfo
from incstore.errors import (
    IncstoreError,
    ManifestError,
    StoreError,
    StoreHashMismatchError,
    combine,
)
from incstore.manifest import ChunkRef, Item, Manifest, from_bytes, now_utc
from incstore.store import Store
from incstore.storepath import StorePath, nix32_encode

MT_THRESHOLD = 32 << 20  # items above this use zstd's own worker threads as well
# Level 2 saves 20% of the CPU of level 3 for 5% more bytes (bench/: the chunk store stays
# within 1.05x the size of a `tar | zstd -3` archive of the same store).
DEFAULT_LEVEL = 2

Progress = Callable[[str, str], None]


def narinfo_hash(db_hash: str) -> str:
    """`sha256:<hex>` as the DB has it, to `sha256:<nix32>` as narinfo files have it."""
    return "sha256:" + nix32_encode(bytes.fromhex(db_hash.removeprefix("sha256:")))


def variant_key(info: db.PathInfo, store_dir: str) -> str:
    """The key of an item whose hash part is taken by a different NAR of the same path."""
    hash_part = StorePath.parse(info.path, store_dir).hash_part
    return f"{hash_part}.{narinfo_hash(info.hash).removeprefix('sha256:')[:12]}"


def _known_chunks(store: ChunkStore, complete: set[str]) -> dict[str, tuple[str, ChunkRef]]:
    """key -> (narinfo NarHash, chunk ref), from the named manifests: a few GETs instead of one
    narinfo read per reused chunk. Keys the manifests disagree on are left out."""
    known: dict[str, tuple[str, ChunkRef]] = {}
    clash: set[str] = set()
    for name in store.manifest_names():
        with contextlib.suppress(ManifestError):
            for item in from_bytes(store.read_manifest(name), name).items:
                entry = (narinfo_hash(item.info.hash), item.chunk)
                if known.setdefault(item.chunk.key, entry) != entry:
                    clash.add(item.chunk.key)
    return {k: v for k, v in known.items() if k in complete and k not in clash}


@dataclass(frozen=True)
class SavePlan:
    """What a save will do: which items it records, which chunks it must write."""

    flavour: db.Flavour
    store: Store
    cache: str | Path
    items: tuple[db.PathInfo, ...]
    keys: dict[str, str]  # path -> chunk key
    reused: dict[str, ChunkRef] = field(default_factory=dict)  # path -> existing chunk
    external: tuple[str, ...] = ()  # references left out by --exclude-db

    @property
    def to_write(self) -> list[db.PathInfo]:
        return [i for i in self.items if i.path not in self.reused]

    def to_json(self) -> dict[str, Any]:
        return {
            "flavour": self.flavour.name,
            "cache": str(self.cache),
            "items": len(self.items),
            "write": [i.path for i in self.to_write],
            "reuse": sorted(self.reused),
            "nar_bytes_to_write": sum(i.nar_size for i in self.to_write),
            "external": list(self.external),
        }


def plan_save(
    db_path: Path,
    prefix: Path,
    cache: str | Path,
    closure_of: Iterable[str] = (),
    exclude_dbs: Iterable[Path] = (),
) -> SavePlan:
    snapshot = db.read_snapshot(db_path)
    flavour = snapshot.flavour
    roots = list(closure_of)
    paths = snapshot.closure(roots) if roots else sorted(snapshot.infos)
    excluded: set[str] = set()
    for other in exclude_dbs:
        excluded |= set(db.valid_paths(other, flavour))
    infos = tuple(snapshot.infos[p] for p in paths if p not in excluded)
    store = ChunkStore(cache)
    if store.exists():
        store.check_store_dir(flavour.store_dir)
    complete = store.complete_keys()
    known = _known_chunks(store, complete) if complete else {}

    def existing(key: str) -> tuple[str, ChunkRef]:
        if key not in known:
            found = store.read_narinfo(key)
            known[key] = (found.nar_hash, ChunkRef(key, found.file_size, found.xxh3_128))
        return known[key]

    keys: dict[str, str] = {}
    reused: dict[str, ChunkRef] = {}
    for info in infos:
        hash_part = StorePath.parse(info.path, flavour.store_dir).hash_part
        ours = hash_part in complete and existing(hash_part)[0] == narinfo_hash(info.hash)
        key = hash_part if ours or hash_part not in complete else variant_key(
            info, flavour.store_dir)
        keys[info.path] = key
        if key in complete:
            reused[info.path] = existing(key)[1]
    kept = {i.path for i in infos}
    external = tuple(sorted({r for i in infos for r in i.references if r not in kept}))
    return SavePlan(flavour, Store(prefix, flavour), cache, infos, keys, reused, external)


class _HashingWriter:
    """File-like sink that hashes and counts the compressed bytes on their way to disk."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.xxh = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.xxh.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _narinfo(info: db.PathInfo, key: str, ref: ChunkRef) -> NarInfo:
    def base(path: str) -> str:
        return path.rsplit("/", 1)[1]

    return NarInfo(
        store_path=info.path,
        url=f"nar/{key}.nar.zst",
        file_size=ref.size,
        nar_hash=narinfo_hash(info.hash),
        nar_size=info.nar_size,
        references=tuple(base(r) for r in info.references),
        deriver=base(info.deriver) if info.deriver else None,
        xxh3_128=ref.xxh3_128,
        ca=info.ca,
        sigs=tuple(info.sigs.split()) if info.sigs else (),
    )


def write_chunk(
    chunks: ChunkStore, store: Store, info: db.PathInfo, key: str, level: int, threads: int
) -> ChunkRef:
    """Serialise, verify and compress one item into the chunk store; return its chunk ref."""
    source = store.physical(info.path)
    if not os.path.lexists(source):
        raise StoreError("is valid in the DB but missing from the store", item=info.path)
    # no pledged content size: an item that changed size must reach the hash check below
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=threads)
    try:
        with chunks.write_chunk(key) as f:
            out = _HashingWriter(f)
            try:
                # _HashingWriter has the write() stream_writer needs; zstandard's stub asks IO
                writer = cctx.stream_writer(out, closefd=False)  # type: ignore[arg-type]
                with writer as zw:
                    digest = nar.dump_hashed(source, zw.write)
            except OSError as e:
                raise StoreError(f"cannot read: {e}", item=info.path) from e
            if digest.db_hash != info.hash or digest.size != info.nar_size:
                raise StoreHashMismatchError(
                    f"contents changed: NAR is {digest.db_hash} ({digest.size} bytes) but the "
                    f"DB records {info.hash} ({info.nar_size} bytes); not saved",
                    item=info.path,
                )
        ref = ChunkRef(key, out.size, out.xxh.hexdigest())
    except AlreadyExists:
        # another save wrote this chunk first (or one that died before its narinfo): keep
        # theirs if it holds our NAR, else ours goes under the key for a different NAR
        found = chunks.inspect(key)
        if (found.nar_sha256, found.nar_size) != (info.hash.removeprefix("sha256:"), info.nar_size):
            return write_chunk(chunks, store, info, variant_key(info, store.flavour.store_dir),
                               level, threads)
        ref = ChunkRef(key, found.size, found.xxh3_128)
    chunks.write_narinfo(key, _narinfo(info, key, ref))
    return ref


@dataclass
class SaveResult:
    manifest: Manifest
    written: list[str]
    reused: list[str]
    failed: list[IncstoreError]
    bytes_written: int

    def to_json(self) -> dict[str, Any]:
        return {
            "items": len(self.manifest.items),
            "written": len(self.written),
            "reused": len(self.reused),
            "failed": [str(e) for e in self.failed],
            "chunk_bytes_written": self.bytes_written,
        }

    def error(self) -> IncstoreError | None:
        """The error the run as a whole ends with, if any item failed."""
        return combine(self.failed, "save") if self.failed else None


def _without_dependents(items: Iterable[Item], bad: set[str]) -> list[Item]:
    """Drop items that (transitively) reference a path in `bad`, so the manifest stays closed."""
    remaining = list(items)
    changed = True
    while changed:
        kept = [i for i in remaining if not (set(i.info.references) & bad)]
        changed = len(kept) != len(remaining)
        bad |= {i.path for i in remaining} - {i.path for i in kept}
        remaining = kept
    return remaining


def _record(chunks: ChunkStore, name: str, manifest: Manifest) -> None:
    """Record the manifest under its name. An unchanged one is written again byte for byte: its
    mtime (the last save, which gc's --keep-days counts from) moves on, and the store's digest
    stays the same."""
    data = manifest.to_bytes()
    with contextlib.suppress(ManifestError):
        old = chunks.read_manifest(name)
        with contextlib.suppress(ManifestError):
            if from_bytes(old, name).same_content(manifest):
                data = old
    chunks.write_manifest(name, data)


def execute_save(
    plan: SavePlan,
    manifest_path: Path | None,
    *,
    name: str | None = None,
    jobs: int = 2,
    level: int = DEFAULT_LEVEL,
    progress: Progress | None = None,
) -> SaveResult:
    """Write the plan's new chunks, then the manifest: to `manifest_path`, and into the chunk
    store as `manifests/<name>.json` when `name` is given."""
    chunks = ChunkStore(plan.cache)
    chunks.init(plan.flavour.store_dir)
    chunks.sweep()
    if manifest_path is not None:
        atomicfile.sweep(manifest_path.parent)
    # announce every chunk this save will name, so that a gc running meanwhile keeps them
    pending = chunks.write_pending(plan.keys.values())
    chunks.renew_chunks(ref.key for ref in plan.reused.values())
    try:
        return _save(plan, chunks, manifest_path, name, jobs, level, progress)
    finally:
        chunks.drop_pending(pending)


def _save(plan: SavePlan, chunks: ChunkStore, manifest_path: Path | None, name: str | None,
          jobs: int, level: int, progress: Progress | None) -> SaveResult:
    refs: dict[str, ChunkRef] = dict(plan.reused)
    failed: list[IncstoreError] = []
    written: list[str] = []

    def one(info: db.PathInfo) -> tuple[db.PathInfo, ChunkRef | IncstoreError]:
        threads = jobs if info.nar_size > MT_THRESHOLD and jobs > 1 else 0
        try:
            return info, write_chunk(chunks, plan.store, info, plan.keys[info.path], level, threads)
        except IncstoreError as e:
            return info, e

    def run(todo: list[db.PathInfo]) -> None:
        with ThreadPoolExecutor(max_workers=max(jobs, chunks.backend.min_workers)) as pool:
            for info, outcome in pool.map(one, todo):
                if isinstance(outcome, IncstoreError):
                    failed.append(outcome)
                    if progress:
                        progress("failed", str(outcome))
                    continue
                refs[info.path] = outcome
                written.append(info.path)
                if progress:
                    progress("saved", info.path)

    # large items first, so the tail of the run is not one big item on one core
    run(sorted(plan.to_write, key=lambda i: -i.nar_size))
    # a gc that planned before our pending record existed may have swept a reused chunk
    present = chunks.chunk_files()
    run([i for i in plan.items if i.path in plan.reused and refs[i.path].key not in present])
    items = [Item(info, refs[info.path]) for info in plan.items if info.path in refs]
    items = _without_dependents(items, {e.item for e in failed if e.item})
    manifest = Manifest(plan.flavour, tuple(items), now_utc(), plan.external)
    if manifest_path is not None:
        manifest.write(manifest_path)
    if name is not None:
        _record(chunks, name, manifest)
    return SaveResult(manifest, written, sorted(plan.reused), failed,
                      sum(refs[p].size for p in written))
