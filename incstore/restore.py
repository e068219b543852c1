"""Restore: the verb that brings a manifest's missing items into a store and registers them.

`plan_restore` compares the manifest with the target DB and the files on disk and decides, per
item, whether it is present (valid and on disk: left alone) or must be extracted. It touches
nothing, and `--dry-run` prints it. `execute_restore` extracts each missing item into a temporary
name inside the store directory, verifies it (chunk xxh3 and size, NAR sha256 and size), renames
it into place, and only then registers what succeeded, minus anything whose references failed,
in one DB transaction. Nothing unverified ever appears under a final store path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import xxhash
import zstandard

from incstore import atomicfile, db, faults, nar
from incstore.backend import Reader
from incstore.chunkstore import ChunkStore
from incstore.errors import (
    ChunkCorruptError,
    IncstoreError,
    NarFormatError,
    StoreError,
    combine,
)
from incstore.locks import PathLock, ensure_open_files, hold
from incstore.manifest import ChunkRef, Item, Manifest
from incstore.store import Store, remove_tree

Progress = Callable[[str, str], None]
DbMode = Literal["swap", "out", "in-place"]


class Action(StrEnum):
    PRESENT = "present"  # valid in the DB and on disk: untouched
    EXTRACT = "extract"  # not on disk: extract and register
    REPLACE = "replace"  # on disk but not valid (debris of an interrupted build): replace


@dataclass(frozen=True)
class RestorePlan:
    manifest: Manifest
    store: Store
    cache: str | Path
    db_path: Path  # the DB read to decide what is valid
    db_mode: DbMode
    db_out: Path | None
    actions: dict[str, Action]
    # external references (see Manifest.external) that the target store does not have
    missing_external: tuple[str, ...] = ()

    def paths(self, *actions: Action) -> list[str]:
        return [p for p, a in self.actions.items() if a in actions]

    @property
    def to_extract(self) -> list[Item]:
        wanted = set(self.paths(Action.EXTRACT, Action.REPLACE))
        return [i for i in self.manifest.items if i.path in wanted]

    def to_json(self) -> dict[str, Any]:
        return {
            "flavour": self.manifest.flavour.name,
            "store": str(self.store.store_root),
            "db": str(self.db_out or self.db_path),
            "db_mode": self.db_mode,
            "items": len(self.actions),
            "present": self.paths(Action.PRESENT),
            "extract": self.paths(Action.EXTRACT),
            "replace": self.paths(Action.REPLACE),
            "nar_bytes_to_extract": sum(i.info.nar_size for i in self.to_extract),
            "missing_external": list(self.missing_external),
        }


def plan_restore(
    manifest: Manifest,
    prefix: Path,
    cache: str | Path,
    *,
    db_path: Path | None = None,
    db_out: Path | None = None,
    in_place: bool = False,
) -> RestorePlan:
    store = Store(prefix, manifest.flavour)
    target = db_path or store.default_db
    valid = db.valid_paths(target, manifest.flavour) if target.exists() else {}
    actions: dict[str, Action] = {}
    for item in manifest.items:
        on_disk = store.exists(item.path)
        if item.path in valid and on_disk:
            actions[item.path] = Action.PRESENT
        elif on_disk:
            actions[item.path] = Action.REPLACE
        else:
            actions[item.path] = Action.EXTRACT
    missing = tuple(p for p in manifest.external if p not in valid or not store.exists(p))
    mode: DbMode = "out" if db_out else "in-place" if in_place else "swap"
    return RestorePlan(manifest, store, cache, target, mode, db_out, actions, missing)


class _HashingReader:
    """Reads the compressed chunk, hashing and counting every byte taken from the file."""

    def __init__(self, f: Reader) -> None:
        self.f = f
        self.xxh = xxhash.xxh3_128()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.xxh.update(data)
        self.size += len(data)
        return data

    def check(self, chunk: ChunkRef, item: str) -> None:
        """Read the rest of the chunk; it must be the one the manifest names."""
        while self.read(1 << 20):
            pass
        if self.size != chunk.size or self.xxh.hexdigest() != chunk.xxh3_128:
            raise ChunkCorruptError(
                f"chunk {chunk.key} ({self.size} bytes) fails its size or xxh3 check", item=item
            )


def extract_item(chunks: ChunkStore, store: Store, item: Item, store_fd: int,
                 owner: tuple[int, int] | None) -> None:
    """Extract one item to a temporary name, verify it, and rename it into place; files get
    `owner` (see `Store.owner`) when it is given."""
    info, chunk = item.info, item.chunk
    final = item.path.rsplit("/", 1)[1]
    tmp = store.temp_name(chunk.key)
    f = chunks.open_chunk(chunk.key, item=item.path)
    try:
        raw = _HashingReader(f)
        try:
            dctx = zstandard.ZstdDecompressor()
            # _HashingReader has the read() that stream_reader needs; zstandard's stub asks IO
            reader = dctx.stream_reader(raw, read_across_frames=False)  # type: ignore[arg-type]
            try:
                digest = nar.restore(reader.read, store_fd, tmp, owner=owner, item=item.path)
            except NarFormatError:
                # a damaged chunk reads as a broken NAR: blame the chunk when it fails its own
                # checksum, the archive only when the chunk is the one the manifest names
                raw.check(chunk, item.path)
                raise
            faults.point("restore.extracted")
            raw.check(chunk, item.path)
            if digest.db_hash != info.hash or digest.size != info.nar_size:
                raise ChunkCorruptError(
                    f"NAR hash {digest.db_hash} ({digest.size} bytes) is not the manifest's "
                    f"{info.hash} ({info.nar_size} bytes)",
                    item=item.path,
                )
            if os.path.lexists(os.path.join(store.store_root, final)):
                # debris of an interrupted build or a path whose files the DB lost: moved aside
                # first, so the final name is never without a complete tree for long
                trash = store.temp_name(chunk.key)
                os.rename(final, trash, src_dir_fd=store_fd, dst_dir_fd=store_fd)
                remove_tree(store.store_root / trash)
            os.rename(tmp, final, src_dir_fd=store_fd, dst_dir_fd=store_fd)
            faults.point("restore.renamed")
        except zstandard.ZstdError as e:
            remove_tree(store.store_root / tmp)
            raise ChunkCorruptError(f"chunk {chunk.key} does not decompress: {e}",
                                    item=item.path) from e
        except IncstoreError:
            remove_tree(store.store_root / tmp)
            raise
        except OSError as e:
            remove_tree(store.store_root / tmp)
            raise StoreError(f"cannot extract: {e}", item=item.path) from e
    finally:
        f.close()


@dataclass
class RestoreResult:
    plan: RestorePlan
    extracted: list[str]
    registered: list[str]
    failed: list[IncstoreError]
    swept: list[str]

    @property
    def skipped(self) -> list[str]:
        """Extracted but not registered: something they reference failed."""
        return sorted(set(self.extracted) - set(self.registered))

    def to_json(self) -> dict[str, Any]:
        return {
            "items": len(self.plan.actions),
            "present": len(self.plan.paths(Action.PRESENT)),
            "extracted": len(self.extracted),
            "registered": len(self.registered),
            "failed": [str(e) for e in self.failed],
            "skipped": self.skipped,
            "db": str(self.plan.db_out or self.plan.db_path),
        }

    def error(self) -> IncstoreError | None:
        return combine(self.failed, "restore") if self.failed else None


def _registrable(plan: RestorePlan, extracted: set[str], valid: set[str]) -> list[db.PathInfo]:
    """Extracted items all of whose references are present or registrable, transitively."""
    ok = set(plan.paths(Action.PRESENT)) | extracted | valid
    external = set(plan.manifest.external) - set(plan.missing_external)
    by_path = plan.manifest.by_path()
    changed = True
    while changed:
        changed = False
        for path in list(ok):
            if any(ref not in ok and ref not in external for ref in by_path[path].info.references):
                ok.discard(path)
                changed = True
    return [by_path[p].info for p in sorted(ok & extracted)]


def _sweep_stale_locks(plan: RestorePlan) -> None:
    """Delete the `.lock` files of present items that nobody holds (left by a killed run)."""
    primitive = plan.manifest.flavour.lock_primitive
    with os.scandir(plan.store.store_root) as entries:
        names = {e.name for e in entries if e.name.endswith(".lock")}
    for path in plan.paths(Action.PRESENT):
        lock_file = plan.store.lock_file(path)
        if lock_file.name in names:
            lock = PathLock(lock_file, primitive)
            if lock.acquire(blocking=False):
                lock.release()


def execute_restore(
    plan: RestorePlan, *, jobs: int = 2, progress: Progress | None = None
) -> RestoreResult:
    store = plan.store
    flavour = plan.manifest.flavour
    chunks = ChunkStore(plan.cache)
    chunks.check_store_dir(plan.manifest.store_dir)
    store.store_root.mkdir(parents=True, exist_ok=True)
    store.state_root.mkdir(parents=True, exist_ok=True)
    todo = sorted(plan.to_extract, key=lambda i: -i.info.nar_size)
    ensure_open_files(len(todo) + 256)
    failed: list[IncstoreError] = []
    extracted: list[str] = []
    became_valid: list[str] = []
    locks: list[PathLock] = []
    # a shared gc.lock makes a collection wait, so nothing extracted but not yet registered
    # can be deleted under us
    with hold(store.gc_lock, flavour.lock_primitive, exclusive=False, blocking=True,
              what="gc.lock"):
        swept = store.sweep_temps()
        atomicfile.sweep(plan.db_path.parent)
        store_fd = os.open(store.store_root, os.O_RDONLY | os.O_DIRECTORY)
        owner = store.owner()
        try:

            missing = set(plan.missing_external)

            def one(item: Item) -> IncstoreError | bool:
                lacking = sorted(set(item.info.references) & missing)
                if lacking:
                    return StoreError(f"references {lacking[0]}, which the manifest leaves to "
                                      "the target store, but it is not valid there", item=item.path)
                lock = PathLock(store.lock_file(item.path), flavour.lock_primitive)
                lock.acquire()
                locks.append(lock)
                # a daemon session may have built or substituted it while we waited
                if (store.exists(item.path) and plan.db_path.exists()
                        and db.is_valid(plan.db_path, item.path)):
                    return False
                try:
                    extract_item(chunks, store, item, store_fd, owner)
                except IncstoreError as e:
                    return e
                return True

            with ThreadPoolExecutor(max_workers=max(jobs, chunks.backend.min_workers)) as pool:
                for item, outcome in zip(todo, pool.map(one, todo), strict=True):
                    if isinstance(outcome, IncstoreError):
                        failed.append(outcome)
                        if progress:
                            progress("failed", str(outcome))
                        continue
                    (extracted if outcome else became_valid).append(item.path)
                    if progress:
                        progress("restored", item.path)
            infos = _registrable(plan, set(extracted), set(became_valid))
            if infos or plan.db_mode == "out" or not plan.db_path.exists():
                _register(plan, infos)
        finally:
            os.close(store_fd)
            for lock in locks:
                lock.release()
        _sweep_stale_locks(plan)
    return RestoreResult(plan, sorted(extracted), [i.path for i in infos], failed, swept)


def _register(plan: RestorePlan, infos: list[db.PathInfo]) -> None:
    flavour = plan.manifest.flavour
    source = plan.db_path if plan.db_path.exists() else None
    if plan.db_mode == "out":
        assert plan.db_out is not None
        db.write_copy(source, plan.db_out, flavour, infos)
    elif plan.db_mode == "in-place" and source is not None:
        with db.big_lock(plan.db_path, flavour, exclusive=False):
            db.register_in_place(plan.db_path, flavour, infos)
    else:
        db.swap_in(plan.db_path, flavour, infos)


