"""Check: the verb that tells whether a chunk store still holds what its manifests need.

Quick mode reads each referenced chunk file once for its size and XXH3-128 (no decompression);
`full` also decompresses it and checks the NAR's sha256 and size against the manifest. Orphans
(chunks no manifest references) are listed, not counted as damage.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incstore.chunkstore import ChunkStore
from incstore.errors import ChunkCorruptError, ChunkMissingError, IncstoreError, combine
from incstore.manifest import Item, Manifest


@dataclass
class CheckReport:
    checked: int = 0
    damaged: list[IncstoreError] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "ok": not self.damaged,
            "missing": [str(e) for e in self.damaged if isinstance(e, ChunkMissingError)],
            "corrupt": [str(e) for e in self.damaged if isinstance(e, ChunkCorruptError)],
            "orphans": self.orphans,
        }

    def error(self) -> IncstoreError | None:
        return combine(self.damaged, "check") if self.damaged else None


def _check_one(chunks: ChunkStore, item: Item, full: bool, present: set[str]
               ) -> IncstoreError | None:
    key = item.chunk.key
    try:
        if key not in present:
            return ChunkMissingError(f"chunk {key} is missing", item=item.path)
        if full:
            found = chunks.inspect(key, item=item.path)
            nar_ok = ("sha256:" + found.nar_sha256, found.nar_size) == (item.info.hash,
                                                                         item.info.nar_size)
            if not nar_ok:
                return ChunkCorruptError(f"chunk {key} holds a NAR other than the manifest's",
                                         item=item.path)
            size, xxh = found.size, found.xxh3_128
        else:
            size, xxh = chunks.quick_digest(key, item=item.path)
        if (size, xxh) != (item.chunk.size, item.chunk.xxh3_128):
            return ChunkCorruptError(f"chunk {key} fails its size or xxh3 check", item=item.path)
    except IncstoreError as e:
        return e
    return None


def check(cache: str | Path, manifests: Mapping[str, Manifest], *, full: bool = False,
          jobs: int = 2) -> CheckReport:
    chunks = ChunkStore(cache)
    unique: dict[tuple[str, str, int, str], Item] = {}
    for m in manifests.values():
        for item in m.items:
            unique.setdefault((item.chunk.key, item.info.hash, item.chunk.size,
                               item.chunk.xxh3_128), item)
    report = CheckReport(checked=len(unique))
    items = sorted(unique.values(), key=lambda i: i.path)
    present = set(chunks.chunk_files())  # one listing, not one request per chunk
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        found = pool.map(lambda i: _check_one(chunks, i, full, present), items)
        report.damaged = [e for e in found if e]
    referenced = {key for key, _, _, _ in unique}
    report.orphans = sorted(k for k in present if k not in referenced)
    return report
