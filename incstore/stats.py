"""Stats: the verb that shows what a shared chunk store holds and how its manifests overlap.

Per manifest: items, NAR bytes, chunk bytes, bytes of chunks only it references (unique) and of
chunks it shares with another; for the store: bytes held and an overlap matrix (chunk bytes
each pair of manifests shares). `diff` compares two manifests item by item.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from incstore.manifest import Manifest


def _chunks(m: Manifest) -> dict[str, int]:
    return {m.chunk_key(n): m.chunk(n).size for n in range(len(m))}


@dataclass
class StatsReport:
    manifests: dict[str, dict[str, int]]
    overlap: dict[str, dict[str, int]]
    store_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"manifests": self.manifests, "overlap": self.overlap,
                "store_bytes": self.store_bytes}


def stats(manifests: Mapping[str, Manifest], store_bytes: int) -> StatsReport:
    keys = {name: _chunks(m) for name, m in manifests.items()}
    users = Counter(k for chunk_map in keys.values() for k in chunk_map)
    per: dict[str, dict[str, int]] = {}
    for name, m in manifests.items():
        chunk_map = keys[name]
        unique = sum(size for k, size in chunk_map.items() if users[k] == 1)
        per[name] = {
            "items": len(m),
            "nar_bytes": sum(m.nar_size(n) for n in range(len(m))),
            "chunk_bytes": sum(chunk_map.values()),
            "unique_bytes": unique,
            "shared_bytes": sum(chunk_map.values()) - unique,
        }
    overlap = {a: {b: sum(size for k, size in keys[a].items() if k in keys[b]) for b in keys}
               for a in keys}
    return StatsReport(per, overlap, store_bytes)


@dataclass
class DiffReport:
    only_a: list[str]
    only_b: list[str]
    common: list[str]
    bytes_only_a: int
    bytes_only_b: int
    bytes_common: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def diff(a: Manifest, b: Manifest) -> DiffReport:
    pa, pb = set(a.paths), set(b.paths)
    only_a = sorted(pa - pb)
    only_b = sorted(pb - pa)
    common = sorted(pa & pb)

    def size(m: Manifest, path: str) -> int:
        n = m.index(path)
        assert n is not None
        return m.chunk(n).size

    return DiffReport(only_a, only_b, common, sum(size(a, p) for p in only_a),
                      sum(size(b, p) for p in only_b), sum(size(a, p) for p in common))
