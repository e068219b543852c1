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
    return {item.chunk.key: item.chunk.size for item in m.items}


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
            "items": len(m.items),
            "nar_bytes": sum(i.info.nar_size for i in m.items),
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
    ia, ib = a.by_path(), b.by_path()
    only_a = sorted(set(ia) - set(ib))
    only_b = sorted(set(ib) - set(ia))
    common = sorted(set(ia) & set(ib))
    return DiffReport(only_a, only_b, common,
                      sum(ia[p].chunk.size for p in only_a),
                      sum(ib[p].chunk.size for p in only_b),
                      sum(ia[p].chunk.size for p in common))
