"""Check: the verb that tells whether a chunk store still holds what its manifests need.

Quick mode reads each referenced chunk file once for its size and XXH3-128 (no decompression);
`full` also decompresses it and checks the NAR's sha256 and size against the manifest. Orphans
(chunks no manifest references) are listed, not counted as damage.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incstore.chunkstore import ChunkStore
from incstore.errors import (
    ChunkCorruptError,
    ChunkMissingError,
    IncstoreError,
    ManifestError,
    combine,
)
from incstore.manifest import Manifest
from incstore.pool import bounded_map


@dataclass
class CheckReport:
    checked: int = 0
    damaged: list[IncstoreError] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # manifest name -> why
    quarantined: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "ok": not self.damaged and not self.unreadable,
            "missing": [str(e) for e in self.damaged if isinstance(e, ChunkMissingError)],
            "corrupt": [str(e) for e in self.damaged if isinstance(e, ChunkCorruptError)],
            "other": [str(e) for e in self.damaged
                      if not isinstance(e, ChunkMissingError | ChunkCorruptError)],
            "orphans": self.orphans,
            "unreadable_manifests": self.unreadable,
            "quarantined": self.quarantined,
        }

    def error(self) -> IncstoreError | None:
        if self.damaged:
            return combine(self.damaged, "check")
        if self.unreadable:
            name, why = next(iter(sorted(self.unreadable.items())))
            return ManifestError(f"{len(self.unreadable)} manifest(s) cannot be read: {why}",
                                 item=name)
        return None


@dataclass(frozen=True)
class _Expect:
    """What a manifest says of one chunk: compact, since a check may cover 200,000."""

    key: str
    nar_hash: str
    nar_size: int
    size: int
    xxh3_128: str
    path: str


class _Present:
    """The chunk keys listed, sorted, with a mark for each one a manifest references: a
    few dozen bytes a chunk, however many there are."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.used = bytearray(len(keys))

    def find(self, key: str) -> int | None:
        i = bisect_left(self.keys, key)
        return i if i < len(self.keys) and self.keys[i] == key else None

    def __contains__(self, key: str) -> bool:
        return self.find(key) is not None

    def orphans(self) -> list[str]:
        return [k for k, used in zip(self.keys, self.used, strict=True) if not used]


def _check_one(chunks: ChunkStore, want: _Expect, full: bool, present: _Present
               ) -> IncstoreError | None:
    key = want.key
    try:
        if key not in present:
            return ChunkMissingError(f"chunk {key} is missing", item=want.path)
        if full:
            found = chunks.inspect(key, item=want.path, nar_size=want.nar_size, size=want.size)
            nar_ok = ("sha256:" + found.nar_sha256, found.nar_size) == (want.nar_hash,
                                                                         want.nar_size)
            if not nar_ok:
                return ChunkCorruptError(f"chunk {key} holds a NAR other than the manifest's",
                                         item=want.path)
            size, xxh = found.size, found.xxh3_128
        else:
            size, xxh = chunks.quick_digest(key, item=want.path, size=want.size)
        if (size, xxh) != (want.size, want.xxh3_128):
            return ChunkCorruptError(f"chunk {key} fails its size or xxh3 check", item=want.path)
    except IncstoreError as e:
        return e
    return None


def _expectations(manifests: Mapping[str, Manifest]) -> Iterator[_Expect]:
    """Each distinct (chunk, NAR hash, sizes, xxh3) once, however many manifests name it."""
    seen: set[bytes] = set()  # a 16-byte digest of each: compact for 200,000 items
    several = len(manifests) > 1
    for m in manifests.values():
        for n in range(len(m)):
            ref = m.chunk(n)
            nar_hash = m.nar_hash(n)
            if several:
                ident = hashlib.blake2b(
                    f"{ref.key} {nar_hash} {ref.size} {ref.xxh3_128}".encode(),
                    digest_size=16).digest()
                if ident in seen:
                    continue
                seen.add(ident)
            yield _Expect(ref.key, nar_hash, m.nar_size(n), ref.size, ref.xxh3_128,
                          m.paths[n])


def check(cache: str | Path, manifests: Mapping[str, Manifest], *, full: bool = False,
          jobs: int = 2, unreadable: Mapping[str, str] | None = None) -> CheckReport:
    chunks = ChunkStore(cache)
    report = CheckReport(unreadable=dict(unreadable or {}))
    present = _Present(chunks.chunk_keys())  # one listing, not one request per chunk

    def one(want: _Expect) -> IncstoreError | None:
        return _check_one(chunks, want, full, present)

    for want, error in bounded_map(one, _expectations(manifests),
                                   workers=max(jobs, chunks.backend.min_workers)):
        report.checked += 1
        found = present.find(want.key)
        if found is not None:
            present.used[found] = 1
        if error is not None:
            report.damaged.append(error)
    report.orphans = present.orphans()
    report.quarantined = sorted(e.name for e in chunks.quarantined())
    return report
