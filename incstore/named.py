"""Named: the manifests a chunk store records by name (`manifests/<name>.json`), the roots
of gc and what check, stats and the catalogue report on, read as well as they can be. A
manifest that cannot be read is listed with the reason, not a reason to stop: version 1
manifests give their chunk keys (so gc keeps those chunks), and one written by a newer
incstore is told apart from a broken one, since its chunks cannot be known."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from incstore.chunkstore import ChunkStore
from incstore.errors import IncstoreError, ManifestError
from incstore.manifest import VERSION, Manifest, legacy_chunk_keys


@dataclass
class Named:
    """The named manifests of a chunk store, read as well as they can be."""

    manifests: dict[str, Manifest] = field(default_factory=dict)
    legacy: dict[str, set[str]] = field(default_factory=dict)  # version 1: chunk keys only
    invalid: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be read
    newer: list[str] = field(default_factory=list)  # written by a newer incstore

    def keys(self, names: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            if name in self.manifests:
                m = self.manifests[name]
                out.update(m.chunk_key(n) for n in range(len(m)))
            out |= self.legacy.get(name, set())
        return out

    @property
    def readable(self) -> list[str]:
        return sorted([*self.manifests, *self.legacy])


def read_named(chunks: ChunkStore, names: Iterable[str] | None = None) -> Named:
    """Every named manifest (or those of `names`) that can be read; the others are listed."""
    out = Named()
    for name in chunks.manifest_names() if names is None else names:
        try:
            out.manifests[name] = chunks.load_manifest(name)
            continue
        except ManifestError as e:
            reason = str(e)
        except IncstoreError as e:
            out.invalid[name] = str(e)
            continue
        # read whole only to tell an old or a newer manifest from a broken one
        try:
            data = chunks.read_manifest(name)
        except IncstoreError as e:
            out.invalid[name] = str(e)
            continue
        keys = legacy_chunk_keys(data)
        if keys is not None:
            out.legacy[name] = keys
        elif _newer_version(data):
            out.newer.append(name)
        else:
            out.invalid[name] = reason
    return out


def _newer_version(data: bytes) -> bool:
    head = data[:4096].decode("utf-8", errors="replace")
    m = re.search(r'"version"\s*:\s*([0-9]{1,6})[,}\s]', head)
    return '"incstore-manifest"' in head and m is not None and int(m.group(1)) > VERSION
