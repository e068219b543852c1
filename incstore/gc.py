"""Gc: the verb that keeps a shared chunk store small without breaking any kept manifest.

Manifests recorded by name in the chunk store are the roots (as in niks3). `plan_gc` decides
which manifests go (older than `keep_days`, counted from their last save; then the oldest while
the store is over `max_bytes`) and which chunks no kept manifest references. A chunk younger
than the grace period is never swept: a save writes its chunks before its manifest and renews
the mtime of the chunks it reuses, so a save running at the same time keeps what it needs.
`execute_gc` deletes, re-checking each chunk's age just before, and records a digest of the
store's contents so a workflow can upload the cache only when it changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incstore.chunkstore import ChunkStore
from incstore.errors import ManifestError
from incstore.manifest import Manifest, from_bytes

DIGEST_FILE = "incstore-digest"
DEFAULT_GRACE = 3600
RECHECK_SECONDS = 1.0  # how often a long sweep looks again for saves started meanwhile


@dataclass
class GcPlan:
    cache: str
    expired: list[str]  # manifests older than keep_days
    over_budget: list[str]  # oldest manifests dropped to get under max_bytes
    sweep: list[str]  # chunk keys no kept manifest references, past the grace period
    in_grace: list[str]  # unreferenced but young: kept this time
    bytes_before: int
    bytes_after: int
    grace_seconds: float
    now: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "drop_manifests": sorted(self.expired + self.over_budget),
            "expired": self.expired,
            "over_budget": self.over_budget,
            "sweep_chunks": self.sweep,
            "kept_in_grace": self.in_grace,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


def load_named(chunks: ChunkStore, names: Iterable[str] | None = None) -> dict[str, Manifest]:
    """The manifests recorded in the chunk store (all, or `names`), parsed; an unreadable one
    stops the caller, since nothing can be swept without knowing what it needs."""
    wanted = chunks.manifest_names() if names is None else names
    return {name: from_bytes(chunks.read_manifest(name), name) for name in wanted}


def _keys(manifests: Iterable[Manifest]) -> set[str]:
    return {item.chunk.key for m in manifests for item in m.items}


def plan_gc(cache: str | Path, *, keep_days: float | None = None, max_bytes: int | None = None,
            grace_seconds: float = DEFAULT_GRACE, now: float | None = None) -> GcPlan:
    now = time.time() if now is None else now
    chunks = ChunkStore(cache)
    listed = chunks.manifests()
    manifests = load_named(chunks, listed)
    saved_at = {n: listed[n].mtime for n in manifests}
    expired = sorted(n for n in manifests
                     if keep_days is not None and now - saved_at[n] > keep_days * 86400)
    kept = [n for n in sorted(manifests, key=lambda n: saved_at[n]) if n not in expired]
    announced = set().union(*(keys for _, keys in chunks.pending().values()))
    files = chunks.chunk_files()
    before = sum(e.size for e in files.values())

    def sweepable(roots: list[str]) -> tuple[list[str], list[str]]:
        needed = _keys(manifests[n] for n in roots) | announced
        loose = sorted(k for k in files if k not in needed)
        return ([k for k in loose if now - files[k].mtime > grace_seconds],
                [k for k in loose if now - files[k].mtime <= grace_seconds])

    over_budget: list[str] = []
    sweep, in_grace = sweepable(kept)
    after = before - sum(files[k].size for k in sweep)
    while max_bytes is not None and after > max_bytes and kept:
        over_budget.append(kept.pop(0))
        sweep, in_grace = sweepable(kept)
        after = before - sum(files[k].size for k in sweep)
    return GcPlan(str(cache), expired, over_budget, sweep, in_grace, before, after,
                  grace_seconds, now)


def digest(chunks: ChunkStore) -> str:
    """A digest of what the chunk store holds: its chunks and its manifests' contents."""
    h = hashlib.sha256()
    for key, entry in sorted(chunks.chunk_files().items()):
        h.update(f"chunk {key} {entry.size}\n".encode())
    for name in chunks.manifest_names():
        h.update(f"manifest {name} ".encode())
        h.update(hashlib.sha256(chunks.read_manifest(name)).hexdigest().encode() + b"\n")
    return h.hexdigest()


@dataclass
class GcResult:
    plan: GcPlan
    swept: list[str]
    dropped: list[str]
    digest: str
    changed: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "swept": len(self.swept), "dropped": self.dropped,
                "digest": self.digest, "changed": self.changed}


def _protected(chunks: ChunkStore, plan: GcPlan, dropped: set[str]) -> set[str]:
    """Keys that saves which started or finished since the plan need: what running saves
    announced (pending records younger than the grace period; older ones belong to saves that
    died and are removed) and what manifests written since the plan name."""
    keys: set[str] = set()
    for name, (entry, announced) in chunks.pending().items():
        if time.time() - entry.mtime > plan.grace_seconds:
            chunks.drop_pending(name)
        else:
            keys |= announced
    for name, entry in chunks.manifests().items():
        if name not in dropped and entry.mtime >= plan.now - 1:
            with contextlib.suppress(ManifestError):
                keys |= {i.chunk.key for i in from_bytes(chunks.read_manifest(name), name).items}
    return keys


def execute_gc(plan: GcPlan) -> GcResult:
    chunks = ChunkStore(plan.cache)
    chunks.sweep()
    dropped = sorted(plan.expired + plan.over_budget)
    for name in dropped:
        chunks.delete_manifest(name)
    protected = _protected(chunks, plan, set(dropped))
    checked = time.monotonic()
    swept = []
    for key in plan.sweep:
        if time.monotonic() - checked > RECHECK_SECONDS:
            protected = _protected(chunks, plan, set(dropped))
            checked = time.monotonic()
        if key in protected:
            continue  # needed by a save that started or finished since the plan
        if chunks.sweep_chunk(key, time.time() - plan.grace_seconds):
            swept.append(key)
    # narinfos whose chunk is gone (a gc that died between the two deletions)
    for key in chunks.narinfo_keys() - set(chunks.chunk_files()):
        chunks.backend.delete(chunks.narinfo_name(key))
    new = digest(chunks)
    try:
        old = chunks.backend.read(DIGEST_FILE).decode().strip()
    except FileNotFoundError:
        old = ""
    if old != new:
        chunks.backend.write(DIGEST_FILE, (new + "\n").encode())
    return GcResult(plan, swept, dropped, new, old != new)
