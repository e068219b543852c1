"""Save: the verb that writes a store's valid paths into a chunk store and a manifest.

`plan_save` reads the daemon DB (one snapshot) and the chunk store's listing and decides, per
item, whether its chunk must be written or is already there; it touches nothing. `execute_save`
serialises each new item to NAR, checks the NAR's sha256 against the DB, compresses it into the
chunk store, and writes the manifest last, so a manifest never names a chunk that is not there.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from incstore import atomicfile, db, nar, regularfile, verified
from incstore.atomicfile import AlreadyExists
from incstore.backend import Staged
from incstore.chunkstore import UPSTREAM_DIR, ChunkStore, NarInfo, describes
from incstore.errors import (
    ChunkCorruptError,
    IncstoreError,
    ManifestError,
    StoreError,
    StoreHashMismatchError,
    combine,
)
from incstore.manifest import ChunkRef, Item, Manifest, from_bytes, now_utc, saved_at
from incstore.pool import bounded_map, map_by_size
from incstore.store import Store
from incstore.storepath import StorePath, nix32_encode

if TYPE_CHECKING:  # signing loads the signature module only when a key is given
    import zstandard

    from incstore.signature import SecretKey

MT_THRESHOLD = 32 << 20  # items above this use zstd's own worker threads as well
PUBLISH_BATCH = 4096  # chunks made durable and published together (one sync, not 4096)
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


def _known_chunks(store: ChunkStore, complete: set[str], previous: Manifest | None
                  ) -> dict[str, tuple[str, ChunkRef]]:
    """key -> (DB-form NAR hash, chunk ref), from the named manifests and the previous
    manifest (a file given with --manifest): a few reads instead of one narinfo read per
    reused chunk. Keys the manifests disagree on are left out. Each reused chunk is still
    checked against its size and xxh3 before the save relies on it (`_verify_reused`)."""
    known: dict[str, tuple[str, ChunkRef]] = {}
    clash: set[str] = set()

    def manifests() -> Iterator[Manifest]:
        if previous is not None:
            yield previous
        for name in store.manifest_names():
            if previous is None or name != previous.name:
                with contextlib.suppress(ManifestError):
                    yield from_bytes(store.read_manifest(name), name)

    for m in manifests():
        for n in range(len(m)):
            key = m.chunk_key(n)
            if key not in complete:
                continue
            entry = (m.nar_hash(n), m.chunk(n))
            if known.setdefault(key, entry) != entry:
                clash.add(key)
    return {k: v for k, v in known.items() if k not in clash}


SEEN_REFRESH = 86400  # an item's `seen` time moves on at most once a day: see `_seen`


@dataclass(frozen=True)
class SavePlan:
    """What a save will do: which items it records, which chunks it must write, and which
    items of the previous manifest of the same name it keeps although the store lacks them."""

    flavour: db.Flavour
    store: Store
    cache: str | Path
    items: tuple[db.PathInfo, ...]
    keys: dict[str, str]  # path -> chunk key
    reused: dict[str, ChunkRef] = field(default_factory=dict)  # path -> existing chunk
    external: tuple[str, ...] = ()  # references left out by --exclude-db
    carried: tuple[Item, ...] = ()  # kept from `previous`: not in the store, chunk still held
    previous: Manifest | None = None
    # how long an unchanged manifest, and an unchanged item's `seen`, are kept as they were
    # (see `_record`): at most a day, less when gc keeps manifests for less
    refresh: float = SEEN_REFRESH

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
            "carry": [i.path for i in self.carried],
        }


def plan_save(
    db_path: Path,
    prefix: Path,
    cache: str | Path,
    closure_of: Iterable[str] = (),
    exclude_dbs: Iterable[Path] = (),
    *,
    previous: Manifest | None = None,
    carry_days: float = 0,
    now: float | None = None,
    keep_days: float | None = None,
) -> SavePlan:
    """Plan a save of the valid paths of `db_path` (or the closure of `closure_of`), minus
    those valid in `exclude_dbs`. With `previous` (the last manifest of the same name) and
    `carry_days`, items it lists that the store no longer has are kept for that many days
    after they were last seen in a saved store, if their chunks are still held: a restore
    that could not bring them back must not make the cache forget them. With `keep_days`
    (the gc policy that follows), an unchanged manifest is written anew at least four times
    within that window, so that no gc drops a manifest still in use."""
    now = time.time() if now is None else now
    snapshot = db.read_snapshot(db_path)
    flavour = snapshot.flavour
    roots = list(closure_of)
    paths = snapshot.closure(roots) if roots else sorted(snapshot.infos)
    excluded: set[str] = set()
    for other in exclude_dbs:
        excluded |= set(db.valid_paths(other, flavour))
    infos = tuple(snapshot.infos[p] for p in paths if p not in excluded)
    target = Store(prefix, flavour)
    if infos and not target.store_root.is_dir():
        # one line for the likely mistake (a forgotten --prefix), not one error per item
        raise StoreError(f"is not a directory, but the DB lists {len(infos)} valid paths in "
                         f"{flavour.store_dir} (is --prefix {prefix} the store's root?)",
                         item=str(target.store_root))
    store = ChunkStore(cache)
    if store.exists():
        store.check_store_dir(flavour.store_dir)
    files = store.chunk_files()
    complete = store.narinfo_keys() & set(files)
    known = _known_chunks(store, complete, previous) if complete else {}

    def existing(key: str) -> tuple[str, ChunkRef] | None:
        """What the chunk store says the chunk under `key` holds, if it says so consistently:
        a narinfo that cannot be read, or a chunk file whose listed size is not the recorded
        one, means the chunk is not reused (it is checked and replaced on execution)."""
        if key not in known:
            try:
                found = store.read_narinfo(key)
            except IncstoreError:
                return None
            db_hash = _db_hash(found.nar_hash)
            if db_hash is None:
                return None
            known[key] = (db_hash, ChunkRef(key, found.file_size, found.xxh3_128))
        entry = known[key]
        return entry if files[key].size == entry[1].size else None

    keys: dict[str, str] = {}
    reused: dict[str, ChunkRef] = {}
    for info in infos:
        hash_part = StorePath.parse(info.path, flavour.store_dir).hash_part
        found = existing(hash_part) if hash_part in complete else None
        if found is not None and found[0] == info.hash:
            keys[info.path] = hash_part
            reused[info.path] = found[1]
            continue
        key = hash_part if hash_part not in complete or found is None else variant_key(
            info, flavour.store_dir)
        keys[info.path] = key
        if key != hash_part and key in complete:
            variant = existing(key)
            if variant is not None and variant[0] == info.hash:
                reused[info.path] = variant[1]
    carried = _carry(previous, infos, excluded, complete, carry_days, now) if previous else []
    kept = {i.path for i in infos} | {i.path for i in carried}
    external = tuple(sorted({r for i in infos for r in i.references if r not in kept}
                            | {r for i in carried for r in i.info.references if r not in kept}))
    refresh = SEEN_REFRESH if keep_days is None else min(SEEN_REFRESH, keep_days * 86400 / 4)
    return SavePlan(flavour, target, cache, infos, keys, reused, external,
                    tuple(carried), previous, refresh)


def previous_manifest(cache: str | Path, name: str | None, manifest_path: Path | None = None
                      ) -> Manifest | None:
    """The last manifest saved under `name` in the chunk store (or at `manifest_path`), if
    there is a readable one: a save keeps its items' `seen` times and, with carry_days, the
    items the store lacks."""
    from incstore.manifest import load

    try:
        if name is not None:
            chunks = ChunkStore(cache)
            return from_bytes(chunks.read_manifest(name), name) if chunks.exists() else None
        if manifest_path is not None and manifest_path.exists():
            return load(manifest_path)
    except IncstoreError:
        return None
    return None


def _carry(previous: Manifest, infos: tuple[db.PathInfo, ...], excluded: set[str],
           complete: set[str], carry_days: float, now: float) -> list[Item]:
    """The items of `previous` to keep although the store lacks them (see `plan_save`)."""
    if carry_days <= 0:
        return []
    current = {i.path for i in infos}
    window = carry_days * 86400
    candidates = []
    for n, path in enumerate(previous.paths):
        if path in current or path in excluded or now - previous.seen(n) > window:
            continue
        if previous.chunk_key(n) in complete:
            candidates.append(previous.item(n))
    # a kept item must stay restorable: its references are items, kept, or external
    provided = current | set(previous.external) | excluded | {i.path for i in candidates}
    bad = {i.path for i in candidates if any(r not in provided for r in i.info.references)}
    return _without_dependents(candidates, bad)


class _HashingWriter:
    """File-like sink that hashes and counts the compressed bytes on their way to disk."""

    def __init__(self, f: BinaryIO) -> None:
        import xxhash

        self.f = f
        self.xxh = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.xxh.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _db_hash(narinfo_nar_hash: str) -> str | None:
    """`sha256:<nix32>` as narinfo files spell it, to the DB's `sha256:<hex>`; None if it is
    not a well-formed sha256."""
    from incstore.storepath import nix32_decode

    digest = narinfo_nar_hash.removeprefix("sha256:")
    if len(digest) != 52:
        return None
    try:
        return "sha256:" + nix32_decode(digest).hex()
    except ValueError:
        return None


class Signer:
    """What a save signs with its key (`--sign-key`): a Nix key adds a `Sig` over each item's
    fingerprint (to the narinfo and the manifest); a Guix key adds a `Signature:` field to each
    narinfo, so a guix-daemon given the chunk store as a substitute URL accepts it."""

    def __init__(self, key: SecretKey) -> None:
        from incstore import signature

        self.signature = signature
        self.key = key
        self.public = key.public_key

    def sigs(self, info: db.PathInfo) -> tuple[str, ...]:
        """The item's Nix signatures: the DB's (upstream ones, for Nix), and ours."""
        signature = self.signature
        found = tuple(info.sigs.split()) if info.sigs else ()
        if isinstance(self.key, signature.NixSecretKey):
            ours = signature.nix_sign(self.key, signature.nix_fingerprint(
                info.path, info.hash, info.nar_size, info.references))
            if ours not in found:
                found += (ours,)
        return found

    def narinfo(self, narinfo: NarInfo) -> str:
        text = narinfo.render()
        if isinstance(self.key, self.signature.GuixSecretKey):
            text = self.signature.guix_sign_narinfo(self.key, text)
        return text

    def signed(self, text: str, info: db.PathInfo) -> bool:
        """Whether a narinfo already carries our signature for this item."""
        if isinstance(self.key, self.signature.GuixSecretKey):
            return self.signature.guix_verify_narinfo(text, [self.public]) is not None
        return all(f"Sig: {s}" in text.splitlines() for s in self.sigs(info))


def _narinfo(info: db.PathInfo, key: str, ref: ChunkRef, sigs: tuple[str, ...] | None = None
             ) -> NarInfo:
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
        sigs=sigs if sigs is not None else tuple(info.sigs.split()) if info.sigs else (),
    )


def narinfo_text(info: db.PathInfo, key: str, ref: ChunkRef, signer: Signer | None) -> bytes:
    narinfo = _narinfo(info, key, ref, signer.sigs(info) if signer else None)
    return (signer.narinfo(narinfo) if signer else narinfo.render()).encode()


def write_narinfo(chunks: ChunkStore, info: db.PathInfo, key: str, ref: ChunkRef,
                  signer: Signer | None) -> None:
    chunks.backend.write(chunks.narinfo_name(key), narinfo_text(info, key, ref, signer))


INLINE_NAR = 1 << 20  # NARs up to this size are compressed in one call, in memory
_LOCAL = threading.local()


def _compressor(level: int, threads: int) -> zstandard.ZstdCompressor:
    """A compressor per thread and setting: making one costs more than compressing a small
    item."""
    import zstandard

    cache = _LOCAL.__dict__.setdefault("compressors", {})
    if (level, threads) not in cache:
        cache[level, threads] = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                                         threads=threads)
    return cache[level, threads]  # type: ignore[no-any-return]


def stage_chunk(chunks: ChunkStore, store: Store, info: db.PathInfo, key: str, level: int,
                threads: int) -> tuple[Staged, ChunkRef]:
    """Serialise, verify and compress one item into a staged chunk (published later, with
    others, by `ChunkStore.publish_chunks`)."""
    source = os.fspath(store.physical(info.path))
    cctx = _compressor(level, threads)
    try:
        if info.nar_size <= INLINE_NAR:
            # most items of a real store are small: NAR and chunk in memory, one write (an
            # item that grew past the DB's size is hashed through, not held, and fails the
            # check)
            parts: list[bytes] = []
            held = 0

            def keep(block: bytes) -> None:
                nonlocal held
                held += len(block)
                if held <= INLINE_NAR:
                    parts.append(block)

            _check_digest(info, _dump(info, source, keep))
            import xxhash

            data = cctx.compress(b"".join(parts))
            staged = chunks.backend.stage_bytes(chunks.chunk_name(key), data)
            return staged, ChunkRef(key, len(data), xxhash.xxh3_128_hexdigest(data))
        with chunks.backend.stage(chunks.chunk_name(key)) as f:
            out = _HashingWriter(f)  # type: ignore[arg-type]
            # no pledged content size: an item that changed size must reach the hash check
            writer = cctx.stream_writer(out, closefd=False)  # type: ignore[arg-type]
            with writer as zw:
                digest = _dump(info, source, zw.write)
            _check_digest(info, digest)
            staged = f.staged
    except OSError as e:
        raise StoreError(f"cannot write its chunk: {e.strerror or e}", item=info.path) from e
    return staged, ChunkRef(key, out.size, out.xxh.hexdigest())


def _dump(info: db.PathInfo, source: str, sink: Callable[[bytes], object]) -> nar.NarDigest:
    try:
        return nar.dump_hashed(source, sink)
    except FileNotFoundError as e:
        if not os.path.lexists(source):
            raise StoreError("is valid in the DB but missing from the store",
                             item=info.path) from e
        raise StoreError(f"cannot read: {e.strerror or e}", item=info.path) from e
    except OSError as e:
        raise StoreError(f"cannot read: {e.strerror or e}", item=info.path) from e


def _check_digest(info: db.PathInfo, digest: nar.NarDigest) -> None:
    if digest.db_hash != info.hash or digest.size != info.nar_size:
        raise StoreHashMismatchError(
            f"contents changed: NAR is {digest.db_hash} ({digest.size} bytes) but the "
            f"DB records {info.hash} ({info.nar_size} bytes); not saved",
            item=info.path,
        )


def write_chunk(
    chunks: ChunkStore, store: Store, info: db.PathInfo, key: str, level: int, threads: int,
    *, retry: bool = True, signer: Signer | None = None,
) -> ChunkRef:
    """Serialise, verify and compress one item into the chunk store; return its chunk ref."""
    source = store.physical(info.path)
    if not os.path.lexists(source):
        raise StoreError("is valid in the DB but missing from the store", item=info.path)
    # no pledged content size: an item that changed size must reach the hash check below
    cctx = _compressor(level, threads)
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
        try:
            found = chunks.inspect(key, nar_size=info.nar_size)
        except ChunkCorruptError:
            # junk under our key (planted, or damaged): move it aside and write ours there
            if not retry:
                raise
            chunks.quarantine(key)
            return write_chunk(chunks, store, info, key, level, threads, retry=False,
                               signer=signer)
        if (found.nar_sha256, found.nar_size) != (info.hash.removeprefix("sha256:"), info.nar_size):
            variant = variant_key(info, store.flavour.store_dir)
            if key == variant or not retry:
                raise ChunkCorruptError(f"chunk {key} holds another NAR",
                                        item=info.path) from None
            return write_chunk(chunks, store, info, variant, level, threads, retry=False,
                               signer=signer)
        ref = ChunkRef(key, found.size, found.xxh3_128)
    write_narinfo(chunks, info, key, ref, signer)
    return ref


@dataclass
class SaveResult:
    manifest: Manifest
    written: list[str]
    reused: list[str]
    failed: list[IncstoreError]
    bytes_written: int
    not_written: str | None = None  # why the manifest was not written, when it was not

    def to_json(self) -> dict[str, Any]:
        return {
            "items": len(self.manifest.items),
            "written": len(self.written),
            "reused": len(self.reused),
            "failed": [str(e) for e in self.failed],
            "chunk_bytes_written": self.bytes_written,
            "manifest_written": self.not_written is None,
            "manifest_not_written": self.not_written,
        }

    def error(self) -> IncstoreError | None:
        """The error the run as a whole ends with, if any item failed."""
        return combine(self.failed, "save") if self.failed else None


def _without_dependents(items: Iterable[Item], bad: set[str]) -> list[Item]:
    """Drop items that (transitively) reference a path in `bad`, so the manifest stays closed
    (one pass backwards along references: linear in items plus references)."""
    items = list(items)
    if not bad:
        return items
    referrers: dict[str, list[str]] = {}
    for item in items:
        for ref in item.info.references:
            if ref != item.path:
                referrers.setdefault(ref, []).append(item.path)
    dropped = set(bad)
    todo = list(bad)
    while todo:
        for referrer in referrers.get(todo.pop(), ()):
            if referrer not in dropped:
                dropped.add(referrer)
                todo.append(referrer)
    return [item for item in items if item.path not in dropped]


def _record(chunks: ChunkStore, name: str, manifest: Manifest, refresh: float) -> bytes:
    """Record the manifest under its name. An unchanged one saved less than a day ago is
    written again byte for byte: its mtime moves on and the store's digest stays the same, so
    a CI job uploads nothing. Once a day an unchanged manifest is written anew, so that the
    save time recorded inside it (which gc's --keep-days counts from, and which survives a
    cache's round trip) moves on too."""
    data = manifest.to_bytes()
    with contextlib.suppress(IncstoreError):
        old = chunks.read_manifest(name)
        previous = from_bytes(old, name)
        if previous.same_content(manifest) and \
                time.time() - saved_at(previous, 0) < refresh:
            data = old
    chunks.write_manifest(name, data)
    return data


def execute_save(
    plan: SavePlan,
    manifest_path: Path | None,
    *,
    name: str | None = None,
    jobs: int = 2,
    level: int = DEFAULT_LEVEL,
    progress: Progress | None = None,
    sign_key: SecretKey | None = None,
    substitute_cache: Path | None = None,
    fsync: bool = False,
) -> SaveResult:
    """Write the plan's new chunks, then the manifest: to `manifest_path`, and into the chunk
    store as `manifests/<name>.json` when `name` is given. With `sign_key`, narinfos and the
    manifest are signed (`Signer`; the manifest's detached signature goes to `<manifest>.sig`).
    For a Guix store, the signed narinfos that `guix substitute` cached under
    `substitute_cache` (default: the state directory's `substitute/cache`) are kept beside
    the chunks of the items they describe, when they agree with the DB. The manifest is
    always made durable before it is named; chunks and narinfos only with `fsync` (a torn
    one is caught by its size and XXH3, quarantined, and written again by the next save)."""
    chunks = ChunkStore(plan.cache, fsync=fsync)
    chunks.init(plan.flavour.store_dir)
    chunks.sweep()
    if manifest_path is not None:
        atomicfile.sweep(manifest_path.parent)
    # announce every chunk this save will name, so that a gc running meanwhile keeps them
    pending = chunks.write_pending(plan.keys.values())
    signer = Signer(sign_key) if sign_key is not None else None
    try:
        return _save(plan, chunks, manifest_path, name, jobs, level, progress, signer,
                     substitute_cache)
    finally:
        chunks.drop_pending(pending)


def _verify_reused(plan: SavePlan, chunks: ChunkStore, jobs: int,
                   record: verified.Record | None) -> list[str]:
    """Check every reused chunk cheaply, by its size and XXH3-128 (not its NAR hash): the
    chunk store may hold junk under a narinfo that claims the right NarHash, or a chunk a
    restore found corrupt. A chunk that fails is quarantined, so that it is written anew.
    Chunks this machine checked before and that have not changed since (`verified`) are not
    read again. Renews the mtime of the chunks kept (gc's grace period counts from it).
    Returns the paths whose chunk must be written again."""
    local = chunks.backend.verifies_reads_cheaply
    to_read = []
    for path in sorted(plan.reused):
        ref = plan.reused[path]
        st = chunks.backend.lstat(chunks.chunk_name(ref.key)) if record is not None else None
        if record is None or st is None or not record.vouches(ref.key, st, ref.xxh3_128):
            to_read.append(path)

    def read_back(path: str) -> bool:
        if not local:
            return True  # over the network, the listed size (checked in the plan) is all
        ref = plan.reused[path]
        try:
            found = chunks.quick_digest(ref.key, item=path, size=ref.size)
        except IncstoreError:
            return False
        return found == (ref.size, ref.xxh3_128)

    bad = []
    for path, ok in bounded_map(read_back, to_read,
                                workers=max(jobs, chunks.backend.min_workers)):
        if not ok:
            key = plan.reused[path].key
            with contextlib.suppress(IncstoreError):
                chunks.quarantine(key)
            if record is not None:
                record.forget(key)
            bad.append(path)
    failed = set(bad)
    for path in sorted(plan.reused):
        if path in failed:
            continue
        ref = plan.reused[path]
        st = chunks.renew_chunk(ref.key)
        if record is not None and st is not None:
            record.note(ref.key, st, ref.xxh3_128)  # the renewal moved its change time
    return bad


def _sign_reused(plan: SavePlan, chunks: ChunkStore, reused: dict[str, ChunkRef],
                 signer: Signer, jobs: int) -> None:
    """Give the narinfos of reused chunks our signature where they lack it (a chunk store
    filled before signing began, or signed with another key)."""
    infos = {i.path: i for i in plan.items if i.path in reused}

    def one(path: str) -> None:
        info, ref = infos[path], reused[path]
        try:
            text = chunks.backend.read(chunks.narinfo_name(ref.key)).decode()
            if signer.signed(text, info):
                return
        except (FileNotFoundError, IncstoreError, UnicodeDecodeError):
            pass
        # a narinfo that cannot be rewritten keeps its item's old signatures; the signed
        # manifest still covers the item
        with contextlib.suppress(IncstoreError):
            write_narinfo(chunks, info, ref.key, ref, signer)

    for _ in bounded_map(one, sorted(infos), workers=max(jobs, chunks.backend.min_workers)):
        pass


def _harvest(plan: SavePlan, chunks: ChunkStore, refs: dict[str, ChunkRef],
             cache_dir: Path | None) -> set[str]:
    """Keep the signed narinfos `guix substitute` cached for the saved items (the proof that
    an item is exactly what a substitute server signed) beside their chunks, after checking
    that their StorePath, NarHash, NarSize and References agree with the DB. Returns the paths
    that have one."""
    if plan.flavour.name != "guix":
        return set()
    held = {e.name.removesuffix(".narinfo") for e in chunks.backend.listdir(UPSTREAM_DIR)}
    found = {p for p, ref in refs.items() if ref.key in held}
    where = cache_dir or plan.store.state_root / "substitute" / "cache"
    try:
        servers = [e.path for e in os.scandir(where) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return found
    for info in plan.items:
        ref = refs.get(info.path)
        if ref is None or info.path in found:
            continue
        hash_part = StorePath.parse(info.path, plan.flavour.store_dir).hash_part
        for server in servers:
            try:
                raw = regularfile.read(Path(server) / hash_part, 8 << 20, follow=False)
            except OSError:
                continue
            from incstore import signature

            text = signature.read_substitute_cache_entry(raw, check_expiry=False)
            if text is not None and describes(text, info.path, info.hash, info.nar_size,
                                              info.references):
                with contextlib.suppress(IncstoreError):
                    chunks.write_upstream_narinfo(ref.key, text)
                    found.add(info.path)
                break
    return found


def _save(plan: SavePlan, chunks: ChunkStore, manifest_path: Path | None, name: str | None,
          jobs: int, level: int, progress: Progress | None, signer: Signer | None,
          substitute_cache: Path | None) -> SaveResult:
    # this machine's record of chunks it checked or wrote (see incstore.verified)
    record = verified.Record(Path(chunks.url)) if chunks.backend.verifies_reads_cheaply \
        else None
    reused = dict(plan.reused)
    for path in _verify_reused(plan, chunks, jobs, record):
        del reused[path]
    refs: dict[str, ChunkRef] = dict(reused)
    failed: list[IncstoreError] = []
    failed_paths: set[str] = set()  # errors may name the chunk store rather than the item
    written: list[str] = []

    def for_item(e: IncstoreError, path: str) -> IncstoreError:
        # name the item: a chunk store error names the store or the key
        return e if e.item == path else type(e)(str(e), item=path)

    def one(info: db.PathInfo) -> tuple[Staged, ChunkRef] | IncstoreError:
        threads = jobs if info.nar_size > MT_THRESHOLD and jobs > 1 else 0
        try:
            return stage_chunk(chunks, plan.store, info, plan.keys[info.path], level, threads)
        except IncstoreError as e:
            return for_item(e, info.path)

    def fail(info: db.PathInfo, error: IncstoreError) -> None:
        failed.append(error)
        failed_paths.add(info.path)
        if progress:
            progress("failed", str(error))

    def publish(batch: list[tuple[db.PathInfo, Staged, ChunkRef]]) -> None:
        """Publish a batch of chunks, then their narinfos: each narinfo appears after its
        chunk, and each chunk and narinfo complete and durable before it has its name. The
        narinfos are staged before the chunks are published, so that one sync covers both."""
        staged_batch: list[tuple[db.PathInfo, Staged, ChunkRef, Staged]] = []
        for info, staged, ref in batch:
            try:
                narinfo = chunks.backend.stage_bytes(chunks.narinfo_name(ref.key),
                                                     narinfo_text(info, ref.key, ref, signer))
            except (OSError, IncstoreError) as e:
                chunks.backend.discard(staged)
                fail(info, for_item(e, info.path) if isinstance(e, IncstoreError) else
                     StoreError(f"cannot write its narinfo: {e.strerror or e}", item=info.path))
                continue
            staged_batch.append((info, staged, ref, narinfo))
        try:
            created = chunks.backend.publish([b[1] for b in staged_batch], replace=False)
        except IncstoreError as e:
            for info, staged, _, narinfo in staged_batch:
                chunks.backend.discard(staged)
                chunks.backend.discard(narinfo)
                fail(info, for_item(e, info.path))
            return
        done: list[tuple[db.PathInfo, ChunkRef]] = []
        ready: list[Staged] = []
        for (info, _, ref, narinfo), ok in zip(staged_batch, created, strict=True):
            if ok:
                done.append((info, ref))
                ready.append(narinfo)
                continue
            chunks.backend.discard(narinfo)
            # the key was taken meanwhile (another save, or one that died before its
            # narinfo): the careful path decides between theirs, ours and a variant key
            try:
                refs[info.path] = write_chunk(chunks, plan.store, info, ref.key, level, 0,
                                              signer=signer)
                written.append(info.path)
            except IncstoreError as e:
                fail(info, for_item(e, info.path))
        try:
            # staged before the chunks' sync, so already durable
            chunks.backend.publish(ready, replace=True, durable=True)
        except IncstoreError as e:
            for info, _ in done:
                fail(info, for_item(e, info.path))
            return
        for info, ref in done:
            refs[info.path] = ref
            written.append(info.path)
            if record is not None:
                st = chunks.backend.lstat(chunks.chunk_name(ref.key))
                if st is not None:
                    record.note(ref.key, st, ref.xxh3_128)
            if progress:
                progress("saved", info.path)

    def run(todo: list[db.PathInfo]) -> None:
        workers = max(jobs, chunks.backend.min_workers)
        # large items first, so the tail of the run is not one big item on one core
        todo = sorted(todo, key=lambda i: -i.nar_size)
        # local: small items in this thread while the pool hashes and compresses the large
        # ones (see incstore.pool.overlapped_map)
        results = map_by_size(one, todo, lambda i: i.nar_size, small=INLINE_NAR,
                              workers=workers,
                              overlap=chunks.backend.verifies_reads_cheaply and jobs > 1)
        batch: list[tuple[db.PathInfo, Staged, ChunkRef]] = []
        for info, outcome in results:
            if isinstance(outcome, IncstoreError):
                fail(info, outcome)
                continue
            batch.append((info, *outcome))
            if len(batch) >= PUBLISH_BATCH:
                publish(batch)
                batch = []
        publish(batch)

    run([i for i in plan.items if i.path not in reused])
    # a gc that planned before our pending record existed may have swept a reused chunk
    present = set(chunks.chunk_keys())
    run([i for i in plan.items if i.path in reused and refs[i.path].key not in present])
    if record is not None:
        record.save()
    if signer is not None:
        _sign_reused(plan, chunks, {p: refs[p] for p in reused if p in refs}, signer, jobs)
    upstream = _harvest(plan, chunks, refs, substitute_cache)
    now = int(time.time())
    items = [Item(info, refs[info.path], _seen(plan.previous, info, now, plan.refresh),
                  signer.sigs(info) if signer else _db_sigs(info), info.path in upstream)
             for info in plan.items if info.path in refs] + list(plan.carried)
    items = _without_dependents(items, failed_paths)
    manifest = Manifest.from_items(plan.flavour, items, created=now_utc(), name=name,
                                   external=plan.external)
    if signer is not None:
        from incstore import trust
    not_written = _why_not_written(plan.previous, manifest, failed_paths)
    if not_written is not None:
        return SaveResult(manifest, written, sorted(reused), failed,
                          sum(refs[p].size for p in written), not_written)
    if manifest_path is not None:
        manifest.write(manifest_path)
        if signer is not None:
            atomicfile.write_bytes(manifest_path.with_name(manifest_path.name + ".sig"),
                                   trust.sign_manifest(signer.key, manifest_path.read_bytes()))
    if name is not None:
        data = _record(chunks, name, manifest, plan.refresh)
        if signer is not None:
            chunks.write_manifest_sig(name, trust.sign_manifest(signer.key, data))
    return SaveResult(manifest, written, sorted(reused), failed,
                      sum(refs[p].size for p in written))


def _why_not_written(previous: Manifest | None, manifest: Manifest, failed: set[str]
                     ) -> str | None:
    """A save that failed for some items keeps the manifest it would replace when its own
    would hold less (the chunks it wrote stay, for the next save to name): a broken save
    must not make the cache forget what the last good one recorded."""
    if not failed:
        return None
    if not len(manifest):
        return f"every item failed ({len(failed)}); nothing to record"
    if previous is None:
        return None
    lost = len(set(previous.paths) - set(manifest.paths))
    if lost:
        return (f"the save failed for {len(failed)} item(s) and its manifest would drop "
                f"{lost} item(s) the previous one holds; the previous manifest is kept")
    return None


def _seen(previous: Manifest | None, info: db.PathInfo, now: int, refresh: float) -> int:
    """When the item was last seen in a saved store: now, except that a recent time from the
    previous manifest is kept, so that saving an unchanged store writes an unchanged manifest
    (and uploads nothing)."""
    n = previous.index(info.path) if previous is not None else None
    if previous is not None and n is not None and previous.nar_hash(n) == info.hash and \
            now - previous.seen(n) < refresh:
        return previous.seen(n)
    return now


def _db_sigs(info: db.PathInfo) -> tuple[str, ...]:
    return tuple(info.sigs.split()) if info.sigs else ()
