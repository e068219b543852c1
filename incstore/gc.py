"""Gc: the verb that keeps a shared chunk store small without breaking any kept manifest.

Manifests recorded by name in the chunk store are the roots (as in niks3). `plan_gc` decides
which manifests go (not saved for `keep_days`, counted from their mtime, the last save: a save
rewrites its manifest even when nothing changed, and writes it anew at least daily, so that a
cache that travels as an archive carries the time too; then the oldest while the chunks that
could be freed take more than `max_bytes`)
and which chunks no kept manifest references. A chunk younger than the grace period is never
swept, and never counts against the budget either: a save writes its chunks before its manifest
and renews the mtime of the chunks it reuses, so a save running at the same time keeps what it
needs. The newest manifest, and any saved within the grace period, are never dropped for the
budget. `execute_gc` deletes, re-checking each chunk's age just before, empties the quarantine
of old entries, and records a digest of the store's contents so that a workflow can upload the
cache only when it changed.

Named manifests are input like any other: one that cannot be read is reported and is not a
root. One written by a newer incstore (a version this one does not know) stops the sweep,
since the chunks it needs cannot be known.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incstore.chunkstore import ChunkStore
from incstore.errors import IncstoreError
from incstore.named import read_named

DIGEST_FILE = "incstore-digest"
DEFAULT_GRACE = 3600
RECHECK_SECONDS = 1.0  # how often a long sweep looks again for saves started meanwhile


@dataclass
class GcPlan:
    cache: str
    expired: list[str]  # manifests not saved for keep_days
    over_budget: list[str]  # oldest manifests dropped to get under max_bytes
    sweep: list[str]  # chunk keys no kept manifest references, past the grace period
    in_grace: list[str]  # unreferenced but young: kept this time
    bytes_before: int
    bytes_after: int
    grace_seconds: float
    now: float = field(default_factory=time.time)
    invalid: dict[str, str] = field(default_factory=dict)
    blocked_by: list[str] = field(default_factory=list)  # newer manifests: nothing swept

    def to_json(self) -> dict[str, Any]:
        return {
            "drop_manifests": sorted(self.expired + self.over_budget),
            "expired": self.expired,
            "over_budget": self.over_budget,
            "sweep_chunks": self.sweep,
            "kept_in_grace": self.in_grace,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "unreadable_manifests": self.invalid,
            "sweep_blocked_by": self.blocked_by,
        }


def plan_gc(cache: str | Path, *, keep_days: float | None = None, max_bytes: int | None = None,
            grace_seconds: float = DEFAULT_GRACE, now: float | None = None) -> GcPlan:
    now = time.time() if now is None else now
    chunks = ChunkStore(cache)
    listed = chunks.manifests()
    named = read_named(chunks, listed)
    last = {n: listed[n].mtime for n in named.readable + named.newer}
    expired = sorted(n for n in named.readable
                     if keep_days is not None and now - last[n] > keep_days * 86400)
    kept = [n for n in sorted(named.readable, key=lambda n: last[n]) if n not in expired]
    announced = set().union(*(keys for _, keys in chunks.pending().values()))
    files = chunks.chunk_files()
    before = sum(e.size for e in files.values())

    def sweepable(roots: list[str]) -> tuple[list[str], list[str]]:
        if named.newer:
            return [], []
        needed = named.keys(roots) | announced
        loose = sorted(k for k in files if k not in needed)
        return ([k for k in loose if now - files[k].mtime > grace_seconds],
                [k for k in loose if now - files[k].mtime <= grace_seconds])

    def counted(sweep: list[str], in_grace: list[str]) -> int:
        """Bytes that count against the budget: what stays, minus what is young and loose
        (a concurrent save's chunks, which no drop of a manifest could free)."""
        return before - sum(files[k].size for k in sweep) - sum(files[k].size for k in in_grace)

    over_budget: list[str] = []
    sweep, in_grace = sweepable(kept)
    # the newest manifest, and any saved within the grace period, are never dropped for size
    droppable = [n for n in kept[:-1] if now - last[n] > grace_seconds]
    while max_bytes is not None and counted(sweep, in_grace) > max_bytes and droppable:
        name = droppable.pop(0)
        kept.remove(name)
        over_budget.append(name)
        sweep, in_grace = sweepable(kept)
    after = before - sum(files[k].size for k in sweep)
    return GcPlan(str(cache), expired, over_budget, sweep, in_grace, before, after,
                  grace_seconds, now, named.invalid, named.newer)


def digest(chunks: ChunkStore) -> str:
    """A digest of what the chunk store holds: its chunks and its manifests' contents."""
    h = hashlib.sha256()
    for key, entry in sorted(chunks.chunk_files().items()):
        h.update(f"chunk {key} {entry.size}\n".encode())
    for name in chunks.manifest_names():
        h.update(f"manifest {name} ".encode())
        with contextlib.suppress(IncstoreError):
            h.update(hashlib.sha256(chunks.read_manifest(name)).hexdigest().encode())
        sig = chunks.read_manifest_sig(name)
        if sig is not None:
            h.update(b" " + hashlib.sha256(sig).hexdigest().encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class GcResult:
    plan: GcPlan
    swept: list[str]
    dropped: list[str]
    digest: str
    changed: bool
    quarantine_emptied: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "swept": len(self.swept), "dropped": self.dropped,
                "digest": self.digest, "changed": self.changed,
                "quarantine_emptied": self.quarantine_emptied}


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
    recent = [name for name, entry in chunks.manifests().items()
              if name not in dropped and entry.mtime >= plan.now - 1]
    return keys | read_named(chunks, recent).keys(recent)


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
    emptied = 0
    for entry in chunks.quarantined():
        if time.time() - entry.mtime > plan.grace_seconds:
            chunks.backend.delete(f"quarantine/{entry.name}")
            emptied += 1
    new = digest(chunks)
    try:
        old = chunks.backend.read(DIGEST_FILE).decode(errors="replace").strip()
    except (FileNotFoundError, IncstoreError):
        old = ""
    if old != new:
        chunks.backend.write(DIGEST_FILE, (new + "\n").encode())
    return GcResult(plan, swept, dropped, new, old != new, emptied)
