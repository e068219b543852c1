"""Restore: the verb that brings a manifest's missing items into a store and registers them.

`plan_restore` compares the manifest with the target DB and the files on disk and decides, per
item, whether it is present (valid and on disk: left alone) or must be extracted. It touches
nothing, and `--dry-run` prints it.

`execute_restore` then works in phases, so that a failure never leaves a half-done item under a
final store name:
1. preflight, before the store is touched: the chunk store names the right store directory,
   the store directory is a writable directory, the DB lock the chosen mode needs is free,
   and there is room on the disk;
2. extraction: each missing item is extracted under a temporary name and verified (chunk size
   and XXH3-128, zstd checksum, NAR sha256 and size, with reading stopped the moment the NAR
   outgrows its recorded size); a chunk that does not hold its item's NAR is quarantined so
   that the next save writes it again; with deduplication, each file the daemon would link is
   hashed as it is written and becomes a hard link to its checked `.links` entry;
3. the closure filter: an item is registrable only if everything it references is present,
   registrable or provided as `external` (linear in items plus references);
4. placement and registration, in dependency order and in batches bounded by the descriptors
   available: under the item's `.lock`, debris at its name is moved aside, the tree is renamed
   into place, and the batch is registered; anything that fails here is moved out again;
5. the temporary trees of items that were not registered are removed.
"""

from __future__ import annotations

import contextlib
import os
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from incstore import atomicfile, db, faults, frame, links, mountns, nar, regularfile, verified
from incstore import manifest as manifest_mod
from incstore.backend import Reader
from incstore.chunkstore import ChunkStore
from incstore.errors import (
    ChunkCorruptError,
    DatabaseError,
    IncstoreError,
    LockedError,
    NarFormatError,
    StoreError,
    combine,
)
from incstore.locks import HeldLock, ensure_open_files, take
from incstore.manifest import ChunkRef, Manifest
from incstore.pool import map_by_size
from incstore.store import Store
from incstore.storedir import TEMP_PREFIX, ItemLock, StoreDir, is_plain
from incstore.trust import Policy, Roots, Verdict, judge

Progress = Callable[[str, str], None]
DbMode = Literal["auto", "swap", "out", "in-place"]
FD_RESERVE = 128  # descriptors kept free for workers, the DB and the chunk store
MAX_BATCH = 1024
SMALL_NAR = 1 << 20  # items up to this size are extracted in the calling thread
SPACE_MARGIN = 64 << 20


class Action(str, Enum):
    PRESENT = "present"  # valid in the DB and on disk: untouched
    EXTRACT = "extract"  # not on disk: extract and register
    REPLACE = "replace"  # on disk but not valid (debris of an interrupted build): replace


_ACTIONS = list(Action)


@dataclass(frozen=True)
class RestorePlan:
    manifest: Manifest
    store: Store
    cache: str | Path
    db_path: Path  # the DB read to decide what is valid
    db_mode: DbMode
    db_out: Path | None
    actions: bytearray  # per item index: position of its Action in _ACTIONS
    # external references (see Manifest.external) that the target store does not have
    missing_external: tuple[str, ...] = ()
    owner: tuple[int, int] | None = None  # None: decided at execution (Store.daemon_owner)
    trust: Verdict = field(default_factory=Verdict)
    roots: Roots = field(default_factory=Roots)
    deduplicate: bool = False  # hard-link identical files through the store's .links

    def indices(self, *actions: Action) -> list[int]:
        wanted = {_ACTIONS.index(a) for a in actions}
        return [n for n, a in enumerate(self.actions) if a in wanted]

    def paths(self, *actions: Action) -> list[str]:
        paths = self.manifest.paths
        return [paths[n] for n in self.indices(*actions)]

    @property
    def to_extract(self) -> list[int]:
        return self.indices(Action.EXTRACT, Action.REPLACE)

    def to_json(self) -> dict[str, Any]:
        extract = self.to_extract
        return {
            "flavour": self.manifest.flavour.name,
            "store": str(self.store.store_root),
            "db": str(self.db_out or self.db_path),
            "db_mode": self.db_mode,
            "items": len(self.actions),
            "present": self.paths(Action.PRESENT),
            "extract": self.paths(Action.EXTRACT),
            "replace": self.paths(Action.REPLACE),
            "nar_bytes_to_extract": sum(self.manifest.nar_size(n) for n in extract),
            "deduplicate": self.deduplicate,
            "missing_external": list(self.missing_external),
            "trusted": self.trusted,
            "trust": self.trust.to_json(self.roots),
            "refused": [f"{self.manifest.paths[n]}: {why}"
                        for n, why in sorted(self.trust.refused.items())],
        }

    @property
    def trusted(self) -> bool:
        """Whether every item the restore brings in is vouched for by a trusted key."""
        return self.trust.active and not self.trust.refused


def plan_restore(
    manifest: Manifest,
    prefix: Path,
    cache: str | Path,
    *,
    db_path: Path | None = None,
    db_out: Path | None = None,
    db_mode: DbMode | None = None,
    in_place: bool = False,
    owner: tuple[int, int] | None = None,
    policy: Policy | None = None,
    data: bytes = b"",
    sig: bytes | None = None,
    deduplicate: bool | None = None,
) -> RestorePlan:
    """Plan a restore. With a `policy` whose roots are active, the manifest (`data`, its exact
    bytes, and `sig`, its detached signature) and each item to extract are checked here,
    before anything is written (see `incstore.trust`). `deduplicate` None means what the
    flavour's daemon does by default (Guix links, Nix does not)."""
    store = Store(prefix, manifest.flavour)
    target = db_path or store.default_db
    count = len(manifest)
    valid = bytearray(count)
    valid_external: set[str] = set()
    external = set(manifest.external)
    if target.exists():
        for path in db.iter_valid_paths(target, manifest.flavour):
            n = manifest.index(path)
            if n is not None:
                valid[n] = 1
            elif path in external:
                valid_external.add(path)
    on_disk = _on_disk(store, manifest)
    actions = bytearray(count)
    for n in range(count):
        action = (Action.PRESENT if valid[n] and on_disk[n] else
                  Action.REPLACE if on_disk[n] else Action.EXTRACT)
        actions[n] = _ACTIONS.index(action)
    missing = tuple(p for p in manifest.external
                    if p not in valid_external or not store.exists(p))
    mode: DbMode = ("out" if db_out else "in-place" if in_place else db_mode or "auto")
    verdict = Verdict()
    roots = policy.roots if policy is not None else Roots()
    if policy is not None and roots.active:
        extract = [n for n in range(count) if _ACTIONS[actions[n]] != Action.PRESENT]
        verdict = judge(policy, manifest, data, sig, ChunkStore(cache), extract)
    if deduplicate is None:
        deduplicate = links.DEFAULT_ON[manifest.flavour.name]
    return RestorePlan(manifest, store, cache, target, mode, db_out, actions, missing, owner,
                       verdict, roots, deduplicate)


# from this many items on, one listing of the store directory costs less than an lstat each
_LIST_FROM = 256


def _on_disk(store: Store, manifest: Manifest) -> bytearray:
    """Which items have an entry in the store directory (of any type: what sits at the name
    is examined under the item's lock before anything is placed there)."""
    found = bytearray(len(manifest))
    if not store.store_root.is_dir():
        return found
    cut = len(manifest.store_dir) + 1
    with StoreDir(store.store_root) as sd:
        if len(manifest) >= _LIST_FROM:
            names = sd.listing()
            for n, path in enumerate(manifest.paths):
                found[n] = path[cut:] in names
        else:
            for n, path in enumerate(manifest.paths):
                found[n] = sd.lstat(path[cut:]) is not None
    return found


class _ChunkReader:
    """Reads the compressed chunk, hashing and counting every byte; refuses to read past the
    chunk's recorded size (a damaged chunk with a long tail is not downloaded to its end) and
    checks the zstd frame header before any decompression."""

    def __init__(self, f: Reader, chunk: ChunkRef, nar_size: int, item: str) -> None:
        import xxhash

        self.f = f
        self.chunk = chunk
        self.nar_size = nar_size
        self.item = item
        self.xxh = xxhash.xxh3_128()
        self.size = 0
        self.head = b""
        self.frame = frame.FrameEnd()
        # the chunk cannot hold this item's NAR whatever the manifest says of it (as opposed
        # to a size or xxh3 that differ from the manifest's record of the chunk)
        self.proven_bad = False

    def corrupt(self, why: str, *, proven: bool = False) -> ChunkCorruptError:
        self.proven_bad = self.proven_bad or proven
        return ChunkCorruptError(f"chunk {self.chunk.key} {why}", item=self.item)

    def read(self, n: int = -1) -> bytes:
        room = self.chunk.size + 1 - self.size
        if room <= 0:
            raise self.corrupt(f"is longer than its recorded {self.chunk.size} bytes")
        data = self.f.read(room if n < 0 else min(n, room))
        self.xxh.update(data)
        self.size += len(data)
        if self.size > self.chunk.size:
            raise self.corrupt(f"is longer than its recorded {self.chunk.size} bytes")
        if len(self.head) < frame.HEADER_BYTES:
            self.head += data[: frame.HEADER_BYTES - len(self.head)]
            if len(self.head) >= frame.HEADER_BYTES or not data:
                problem = frame.header_problem(self.head, self.nar_size)
                if problem:
                    raise self.corrupt(problem, proven=True)
        self.frame.feed(data)
        if self.frame.broken or self.frame.trailing:
            raise self.corrupt("has data after its zstd frame" if self.frame.trailing
                               else f"is not one zstd frame ({self.frame.broken})", proven=True)
        return data

    def finish(self) -> None:
        """Read the rest of the chunk; it must be the one the manifest names."""
        while self.read(1 << 20):
            pass
        if self.size != self.chunk.size or self.xxh.hexdigest() != self.chunk.xxh3_128:
            raise self.corrupt(f"({self.size} bytes) fails its size or xxh3 check")


@dataclass
class _Extraction:
    """What extracting one item did."""

    error: IncstoreError | None = None
    quarantine: bool = False  # the chunk does not hold the item's NAR
    # the chunk file, as read and found to match its size and XXH3 (a local chunk store)
    checked: os.stat_result | None = None


def extract_item(chunks: ChunkStore, sd: StoreDir, manifest: Manifest, n: int, tmp: str,
                 owner: tuple[int, int] | None, linker: links.Links | None = None
                 ) -> _Extraction:
    """Extract item `n` under the temporary name `tmp` and verify it; the caller renames it."""
    import zstandard

    path, chunk = manifest.paths[n], manifest.chunk(n)
    nar_hash, nar_size = manifest.nar_hash(n), manifest.nar_size(n)
    try:
        f = chunks.open_chunk(chunk.key, item=path)
    except IncstoreError as e:
        return _Extraction(e)
    raw = _ChunkReader(f, chunk, nar_size, path)
    try:
        reader = frame.decompressor().stream_reader(
            raw, read_across_frames=False)  # type: ignore[arg-type]
        try:
            digest = nar.restore(reader.read, sd.fd, tmp, owner=owner, item=path,
                                 limit=nar_size, links=linker)
        except nar.NarTooLong as e:
            # a bomb, or not this item's chunk: stopped before the excess was written
            return _Extraction(ChunkCorruptError(f"chunk {chunk.key}: {e.args[0]}",
                                                 item=path), True)
        except NarFormatError as e:
            # a damaged chunk reads as a broken NAR: blame the chunk when it fails its own
            # checks, the archive when the chunk is exactly the one the manifest names
            raw.finish()
            return _Extraction(e, True)
        faults.point("restore.extracted")
        raw.finish()
        if digest.db_hash != nar_hash or digest.size != nar_size:
            return _Extraction(ChunkCorruptError(
                f"NAR hash {digest.db_hash} ({digest.size} bytes) is not the manifest's "
                f"{nar_hash} ({nar_size} bytes)", item=path), True)
        fileno = getattr(f, "fileno", None)
        return _Extraction(checked=os.fstat(fileno()) if fileno is not None else None)
    except ChunkCorruptError as e:
        return _Extraction(e, raw.proven_bad)
    except zstandard.ZstdError as e:
        return _Extraction(ChunkCorruptError(f"chunk {chunk.key} does not decompress: {e}",
                                             item=path), True)
    except IncstoreError as e:
        return _Extraction(e)
    except OSError as e:
        return _Extraction(StoreError(f"cannot extract: {e.strerror or e}", item=path))
    finally:
        f.close()


@dataclass
class RestoreResult:
    plan: RestorePlan
    extracted: list[str]
    registered: list[str]
    failed: list[IncstoreError]
    swept: list[str]
    db_mode: str = ""
    warnings: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    linked_files: int = 0  # files that became a hard link to an identical one
    linked_bytes: int = 0  # the space that saved

    @property
    def skipped(self) -> list[str]:
        """Extracted and verified but not registered: something they reference failed."""
        return sorted(set(self.extracted) - set(self.registered))

    def to_json(self) -> dict[str, Any]:
        return {
            "trusted": self.plan.trusted,
            "trust": self.plan.trust.to_json(self.plan.roots),
            "items": len(self.plan.actions),
            "present": len(self.plan.indices(Action.PRESENT)),
            "extracted": len(self.extracted),
            "registered": len(self.registered),
            "failed": [str(e) for e in self.failed],
            "skipped": self.skipped,
            "quarantined": self.quarantined,
            "warnings": self.warnings,
            "db": str(self.plan.db_out or self.plan.db_path),
            "db_mode": self.db_mode,
            "deduplicated": {"files": self.linked_files, "bytes": self.linked_bytes}
            if self.plan.deduplicate else None,
        }

    def error(self) -> IncstoreError | None:
        return combine(self.failed, "restore") if self.failed else None


class _Referrers:
    """Who references each item (self-references left out), as two flat integer arrays: the
    reverse of the manifest's reference lists, a few bytes per reference whatever the size."""

    def __init__(self, manifest: Manifest) -> None:
        count = len(manifest)
        starts = array("l", bytes(8 * (count + 1)))
        for n in range(count):
            for r in manifest.ref_indices(n):
                if r != n and r < count:
                    starts[r + 1] += 1
        for n in range(count):
            starts[n + 1] += starts[n]
        fill = array("l", starts)
        who = array("l", bytes(8 * starts[count]))
        for n in range(count):
            for r in manifest.ref_indices(n):
                if r != n and r < count:
                    who[fill[r]] = n
                    fill[r] += 1
        self.starts = starts
        self.who = who

    def of(self, n: int) -> array[int]:
        return self.who[self.starts[n]: self.starts[n + 1]]


def _closure(manifest: Manifest, ok: bytearray, missing_external: set[str],
             referrers: _Referrers) -> bytearray:
    """Which items are usable: `ok` (present or extracted) and every reference usable (an
    external one: not missing from the target store), by propagating failures backwards
    along references once (linear in items + references)."""
    count = len(manifest)
    usable = bytearray(ok)
    if missing_external:
        for n in range(count):
            if usable[n] and any(r >= count and manifest.external[r - count] in missing_external
                                 for r in manifest.ref_indices(n)):
                usable[n] = 0
    bad = [n for n in range(count) if not usable[n]]
    while bad:
        for referrer in referrers.of(bad.pop()):
            if usable[referrer]:
                usable[referrer] = 0
                bad.append(referrer)
    return usable


def _topological(manifest: Manifest, members: array[int], referrers: _Referrers
                 ) -> tuple[array[int], list[int]]:
    """`members` with references first; the second list holds those on a reference cycle
    (other than a self-reference), which no daemon could register one by one."""
    count = len(manifest)
    inside = bytearray(count)
    for n in members:
        inside[n] = 1
    pending = array("l", bytes(8 * count))
    for n in members:
        pending[n] = sum(1 for r in manifest.ref_indices(n) if r != n and r < count and inside[r])
    ready = sorted(n for n in members if pending[n] == 0)
    order = array("l")
    while ready:
        n = ready.pop()
        order.append(n)
        for m in referrers.of(n):
            if inside[m]:
                pending[m] -= 1
                if pending[m] == 0:
                    ready.append(m)
    placed = bytearray(count)
    for n in order:
        placed[n] = 1
    return order, [n for n in members if not placed[n]]


class _Run:
    """The state of one restore while it executes."""

    def __init__(self, plan: RestorePlan, jobs: int, progress: Progress | None,
                 fsync: bool = False) -> None:
        self.plan = plan
        self.fsync = fsync
        self.manifest = plan.manifest
        self.flavour = plan.manifest.flavour
        self.jobs = jobs
        self.progress = progress
        self.token = os.urandom(4).hex()
        self.failed: list[IncstoreError] = []
        self.warnings: list[str] = []
        self.quarantined: list[str] = []
        self.extracted = bytearray(len(plan.manifest))  # 1: verified tree under its temp name
        self.placed: list[int] = []  # renamed into place, not yet registered (swap/out)
        self.registered: list[int] = []
        self.mode: DbMode = plan.db_mode
        self.big_lock: HeldLock | None = None
        self.linked_files = 0
        self.linked_bytes = 0

    def temp(self, n: int) -> str:
        return f".incstore-tmp-{os.getpid()}-{self.token}-{self.manifest.chunk_key(n)}"

    def fail(self, error: IncstoreError) -> None:
        self.failed.append(error)
        if self.progress:
            self.progress("failed", str(error))


def _read_only(root: Path) -> bool:
    try:
        return bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _preflight(run: _Run, chunks: ChunkStore, sd: StoreDir) -> None:
    """Everything that can refuse the restore, checked before the store is touched."""
    plan = run.plan
    chunks.check_store_dir(plan.manifest.store_dir)
    if sd.read_only():
        raise StoreError(f"is mounted read-only; `sudo mount -o remount,rw {sd.root}` lets "
                         "a restore write it", item=str(sd.root))
    if not os.access(sd.root, os.W_OK):
        raise StoreError("is not writable by this user (run the restore as root)",
                         item=str(sd.root))
    need = sum(plan.manifest.nar_size(n) for n in plan.to_extract)
    free = sd.free_bytes()
    if need + SPACE_MARGIN > free and plan.to_extract:
        raise StoreError(f"has {free} bytes free but the restore needs about {need}",
                         item=str(sd.root))
    if plan.db_mode in ("auto", "swap", "in-place"):
        plan.db_path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = plan.db_path.parent / "big-lock"
        what = "the daemon's big-lock (is the daemon running? use --db-mode in-place)"
        if plan.db_mode in ("auto", "swap"):
            try:
                run.big_lock = take(lock_file, run.flavour.lock_primitive, exclusive=True,
                                    blocking=False, what=what)
                run.mode = "swap"
            except LockedError:
                if plan.db_mode == "swap" or not plan.db_path.exists():
                    raise
                run.mode = "in-place"
        if run.mode == "in-place":
            run.big_lock = take(lock_file, run.flavour.lock_primitive, exclusive=False,
                                blocking=False, what="the daemon's big-lock (a DB swap is "
                                "in progress)")


def execute_restore(plan: RestorePlan, *, jobs: int = 2, progress: Progress | None = None,
                    fsync: bool = False) -> RestoreResult:
    """Carry out the plan. Durability is the daemons' by default: the DB is written in synced
    transactions (or a synced copy swapped in), every item is complete under its final name
    before the DB names it, and a process killed anywhere leaves no half-done item; the
    files themselves are left to the page cache, as guix-daemon and Nix (`fsync-store-paths
    = false`) leave them, so a power cut may leave a registered item damaged, which `guix gc
    --verify=contents` finds. With `fsync`, the extracted trees are made durable (one
    syncfs) and their renames (an fsync of the store directory) before the DB names them."""
    run = _Run(plan, jobs, progress, fsync)
    if not plan.to_extract and plan.db_mode != "out":
        # everything is present: nothing to lock or write, but what killed runs left goes
        return RestoreResult(plan, [], [], [], _sweep_only(plan), "none")
    todo = _workable(run)
    if not todo and plan.db_mode != "out":
        # all refused (or lacking what the target must provide): the target stays exactly
        # as it was, not even a store directory or DB made
        return RestoreResult(plan, [], [], run.failed, [], "none")
    store = plan.store
    chunks = ChunkStore(plan.cache)
    if _read_only(store.store_root):
        # a read-only bind mount (gnu-store.mount): writable in a mount namespace of our own
        mountns.make_writable(store.store_root)
    with StoreDir(store.store_root, create=True) as sd:
        try:
            _preflight(run, chunks, sd)
            store.state_root.mkdir(parents=True, exist_ok=True)
            owner = plan.owner or store.daemon_owner()
            # a shared gc.lock makes a collection wait, so nothing extracted but not yet
            # registered can be deleted under us
            with take(store.gc_lock, run.flavour.lock_primitive, exclusive=False,
                      blocking=True, what="gc.lock"):
                swept, problems = sd.sweep_temps()
                run.warnings += [f"left a stale temporary entry: {p}" for p in problems]
                atomicfile.sweep(plan.db_path.parent)  # DB copies of runs that died
                linker = links.Links(sd.fd, links.RULES[run.flavour.name]) \
                    if plan.deduplicate else None
                try:
                    _extract_all(run, chunks, sd, todo, owner, linker)
                finally:
                    if linker is not None:
                        linker.close()
                        _report_links(run, linker)
                _place_and_register(run, sd)
                _remove_leftovers(run, sd)
                _sweep_stale_locks(run, sd)
        finally:
            if run.big_lock is not None:
                run.big_lock.release()
    paths = plan.manifest.paths
    extracted = [paths[n] for n, done in enumerate(run.extracted) if done]
    return RestoreResult(plan, sorted(extracted), sorted(paths[n] for n in run.registered),
                         run.failed, swept, run.mode, run.warnings, run.quarantined,
                         run.linked_files, run.linked_bytes)


def _sweep_only(plan: RestorePlan) -> list[str]:
    """The sweep of a restore with nothing to extract: the temporary trees and DB copies of
    runs that died, found by one listing of the store directory. A store this run could not
    write (read-only, another user's) is left to a run that can."""
    root = plan.store.store_root
    if not root.is_dir() or _read_only(root) or not os.access(root, os.W_OK):
        return []
    with contextlib.suppress(OSError):
        atomicfile.sweep(plan.db_path.parent)
    with StoreDir(root) as sd:
        if not any(name.startswith(TEMP_PREFIX) for name in sd.names()):
            return []
        return sd.sweep_temps()[0]


def load_manifest(cache: str | Path, *, name: str | None = None, path: Path | None = None,
                  signed: bool = False) -> tuple[Manifest, bytes, bytes | None]:
    """The manifest to restore (named in the chunk store, or a file), its exact bytes and its
    detached signature (None if there is none). Unless the signature is wanted, the manifest
    is parsed as it is read and the bytes are not kept (b"")."""
    chunks = ChunkStore(cache)
    if not signed:
        if path is not None:
            return manifest_mod.load(path), b"", None
        assert name is not None
        return chunks.load_manifest(name), b"", None
    for _ in range(3):
        # the signature is read on both sides of the manifest: a save replacing the two
        # between our reads shows as a change, and the pair is read again
        if path is not None:
            sig = _read_sig(path.with_name(path.name + ".sig"))
            data = manifest_mod.read_file(path)
            again = _read_sig(path.with_name(path.name + ".sig"))
        else:
            assert name is not None
            sig = chunks.read_manifest_sig(name)
            data = chunks.read_manifest(name)
            again = chunks.read_manifest_sig(name)
        if sig == again:
            break
    return manifest_mod.from_bytes(data, str(path or name)), data, again


def _read_sig(path: Path) -> bytes | None:
    try:
        return regularfile.read(path, 1 << 20)
    except OSError:
        return None


def _report_links(run: _Run, linker: links.Links) -> None:
    run.linked_files, run.linked_bytes = linker.linked, linker.saved_bytes
    rejected = sorted(set(linker.rejected))
    for entry in rejected[:10]:
        run.warnings.append(f"{links.LINKS_DIR}/{entry} is not what its name says; "
                            "not linked to")
    if len(rejected) > 10:
        run.warnings.append(f"... and {len(rejected) - 10} more such entries")
    if linker.disabled:
        run.warnings.append(f"stopped deduplicating: {linker.disabled}")


def _workable(run: _Run) -> list[int]:
    """The items to extract, largest first, less those refused by the trust policy or
    referencing an external the target lacks (each recorded as failed)."""
    plan, manifest = run.plan, run.manifest
    missing = set(plan.missing_external)
    for error in plan.trust.errors(manifest):
        run.fail(error)
    todo = []
    for n in sorted(plan.to_extract, key=lambda n: -manifest.nar_size(n)):
        if n in plan.trust.refused:
            continue
        lacking = sorted(set(manifest.references(n)) & missing)
        if lacking:
            run.fail(StoreError(f"references {lacking[0]}, which the manifest leaves to the "
                                "target store, but it is not valid there", item=manifest.paths[n]))
        else:
            todo.append(n)
    return todo


def _extract_all(run: _Run, chunks: ChunkStore, sd: StoreDir, todo: list[int],
                 owner: tuple[int, int] | None, linker: links.Links | None = None) -> None:
    manifest = run.manifest

    def one(n: int) -> _Extraction:
        outcome = extract_item(chunks, sd, manifest, n, run.temp(n), owner, linker)
        if outcome.error is not None:
            report = sd.remove(run.temp(n))
            if report.failures:
                run.warnings.append(f"left a temporary tree of {manifest.paths[n]}: "
                                    f"{report.failures[0]}")
        return outcome

    workers = max(run.jobs, chunks.backend.min_workers)
    # local: small items in this thread while the pool does the large ones, whose
    # decompression, hashing and writes release the GIL (see incstore.pool)
    outcomes = map_by_size(one, todo, manifest.nar_size, small=SMALL_NAR, workers=workers,
                           overlap=chunks.backend.verifies_reads_cheaply and run.jobs > 1)
    # what the restore read and checked, the next save on this machine need not read again
    record = verified.Record(Path(run.plan.cache)) if chunks.backend.verifies_reads_cheaply \
        else None
    for n, outcome in outcomes:
        if outcome.error is None:
            run.extracted[n] = 1
            if record is not None and outcome.checked is not None:
                record.note(manifest.chunk_key(n), outcome.checked, manifest.chunk(n).xxh3_128)
            if run.progress:
                run.progress("restored", manifest.paths[n])
            continue
        run.fail(outcome.error)
        if outcome.quarantine and isinstance(outcome.error, ChunkCorruptError | NarFormatError):
            key = manifest.chunk_key(n)
            if record is not None:
                record.forget(key)
            try:
                if chunks.quarantine(key):
                    run.quarantined.append(key)
            except IncstoreError as e:
                run.warnings.append(f"could not quarantine chunk {key}: {e}")
    if record is not None:
        record.save()


def _batches(run: _Run) -> Iterator[list[int]]:
    """The registrable items in dependency order, in batches whose per-item locks fit in the
    descriptors available."""
    plan, manifest = run.plan, run.manifest
    ok = bytearray(len(manifest))
    for n in plan.indices(Action.PRESENT):
        ok[n] = 1
    for n, done in enumerate(run.extracted):
        if done:
            ok[n] = 1
    referrers = _Referrers(manifest)
    usable = _closure(manifest, ok, set(plan.missing_external), referrers)
    members = array("l", (n for n, done in enumerate(run.extracted) if done and usable[n]))
    order, cyclic = _topological(manifest, members, referrers)
    del referrers
    for n in cyclic:
        run.fail(StoreError("is on a reference cycle; not registered", item=manifest.paths[n]))
    limit = ensure_open_files(MAX_BATCH * 2 + FD_RESERVE)
    size = max(1, min(MAX_BATCH, (limit - FD_RESERVE - run.jobs * 80) // 2))
    for start in range(0, len(order), size):
        yield list(order[start: start + size])


def _place_and_register(run: _Run, sd: StoreDir) -> None:
    plan, manifest = run.plan, run.manifest
    cut = len(manifest.store_dir) + 1
    # a live DB that does not exist yet has no session to race with: it is created whole
    live = run.mode == "in-place" and plan.db_path.exists()
    # a swap holds the daemon's big-lock exclusively: no daemon session (so no build or
    # substitution) and no other restore can run, and the item locks, a file each, would
    # guard against nobody
    exclusive = run.mode == "swap"
    conn = db.open_live(plan.db_path) if live else None
    failed_here: set[int] = set()
    # with --fsync, a power cut must not leave the DB naming an item whose files never reached
    # the disk
    if run.fsync and any(run.extracted):
        sd.sync_trees()
    try:
        for batch in _batches(run):
            locks: list[ItemLock] = []
            placed: list[int] = []
            try:
                for n in batch:
                    if any(r in failed_here for r in manifest.ref_indices(n) if r != n):
                        failed_here.add(n)
                        continue
                    if not exclusive:
                        lock = sd.item_lock(manifest.paths[n][cut:],
                                            run.flavour.lock_primitive)
                        try:
                            lock.acquire()
                        except IncstoreError as e:
                            run.fail(e)
                            failed_here.add(n)
                            continue
                        locks.append(lock)
                    if live and _became_valid(run, conn, n, sd):
                        continue
                    try:
                        report = sd.replace(run.temp(n), manifest.paths[n][cut:])
                    except OSError as e:
                        run.fail(StoreError(f"cannot put in place: {e.strerror}",
                                            item=manifest.paths[n]))
                        failed_here.add(n)
                        continue
                    if report.failures:
                        run.warnings.append(f"left debris of {manifest.paths[n]} under a "
                                            f"temporary name: {report.failures[0]}")
                    faults.point("restore.renamed")
                    placed.append(n)
                if placed and run.fsync:
                    sd.sync_names()
                if live:
                    assert conn is not None
                    try:
                        db.register_batch(conn, plan.db_path, run.flavour,
                                          [_info(run, n) for n in placed])
                    except IncstoreError:
                        _unplace(run, sd, placed)
                        raise
                    run.registered += placed
                else:
                    run.placed += placed
            finally:
                for lock in locks:
                    lock.release()
        if not live:
            _register_copy(run, sd)
    except IncstoreError as e:
        run.fail(e)
    finally:
        if conn is not None:
            conn.close()


def _became_valid(run: _Run, conn: Any, n: int, sd: StoreDir) -> bool:
    """Whether a daemon session built or substituted the item while we were extracting it
    (we hold its lock now, so that cannot change any more). Only a live DB can change under
    us: a swap holds the big-lock exclusively, so no session runs."""
    path = run.manifest.paths[n]
    return db.is_valid_on(conn, path) and sd.exists(path[len(run.manifest.store_dir) + 1:])


def _info(run: _Run, n: int) -> db.PathInfo:
    """The DB row to register for item `n`. When the items were vouched for one by one (the
    manifest is not trusted), only what their signatures cover is taken from the manifest (or
    from the signed narinfo: its deriver)."""
    info = run.manifest.item(n).info
    if not run.plan.trust.per_item:
        return info
    return replace(info, deriver=run.plan.trust.derivers.get(n),
                   registration_time=int(time.time()),
                   derivation_outputs=(), ultimate=None, ca=None)


def _register_copy(run: _Run, sd: StoreDir) -> None:
    plan = run.plan
    if not run.placed and plan.db_mode != "out" and plan.db_path.exists():
        return
    infos = (_info(run, n) for n in run.placed)  # made as they are registered
    try:
        if plan.db_mode == "out":
            assert plan.db_out is not None
            source = plan.db_path if plan.db_path.exists() else None
            db.write_copy(source, plan.db_out, run.flavour, infos)
        elif run.mode == "in-place" and plan.db_path.exists():
            db.register_in_place(plan.db_path, run.flavour, infos)
        else:
            db.swap_in(plan.db_path, run.flavour, infos)
    except (IncstoreError, OSError) as e:
        _unplace(run, sd, run.placed)
        run.placed = []
        if isinstance(e, IncstoreError):
            raise
        raise DatabaseError(f"cannot write the DB: {e.strerror or e}",
                            item=str(plan.db_path)) from e
    run.registered += run.placed
    run.placed = []


def _unplace(run: _Run, sd: StoreDir, placed: list[int]) -> None:
    """Take items that were renamed into place but not registered out again."""
    cut = len(run.manifest.store_dir) + 1
    for n in placed:
        aside = sd.temp_name("unregistered")
        try:
            os.rename(run.manifest.paths[n][cut:], aside, src_dir_fd=sd.fd, dst_dir_fd=sd.fd)
        except OSError as e:
            run.warnings.append(f"could not take {run.manifest.paths[n]} out again: {e}")
            continue
        sd.remove(aside)


def _remove_leftovers(run: _Run, sd: StoreDir) -> None:
    registered = set(run.registered)
    for n, done in enumerate(run.extracted):
        if done and n not in registered:
            report = sd.remove(run.temp(n))
            if report.failures:
                run.warnings.append(f"left a temporary tree of {run.manifest.paths[n]}: "
                                    f"{report.failures[0]}")


def _sweep_stale_locks(run: _Run, sd: StoreDir) -> None:
    """Delete the `.lock` files of present items that nobody holds (left by a killed run);
    in a swap, which took no item locks, those of every item of the manifest."""
    manifest = run.manifest
    cut = len(manifest.store_dir) + 1
    items = range(len(manifest)) if run.mode == "swap" else run.plan.indices(Action.PRESENT)
    wanted = {manifest.paths[n][cut:] + ".lock": n for n in items}
    if not wanted:
        return
    for name in [nm for nm in sd.names() if nm in wanted]:
        st = sd.lstat(name)
        if st is None or not is_plain(st):
            continue
        lock = sd.item_lock(name[: -len(".lock")], run.flavour.lock_primitive)
        try:
            if lock.acquire(blocking=False):
                lock.release()
        except IncstoreError as e:
            run.warnings.append(str(e))

