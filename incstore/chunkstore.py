"""Chunk store: a directory of zstd-compressed NARs, one per store item, laid out as a Nix
binary cache.

    nix-cache-info              StoreDir of the items it holds
    <key>.narinfo               what Nix reads: StorePath, URL, NarHash, NarSize, References...
    nar/<key>.nar.zst           the chunk: the item's NAR as one zstd frame with content checksum
    manifests/<name>.json       manifests recorded by name (see `manifest`)

A chunk's key is the 32-character hash part of its store path. Chunks are write-once: a writer
writes the chunk, then its narinfo, each atomically, and the narinfo's presence is what marks a
chunk as complete. Nothing trusts a chunk: readers check it against the manifest (xxh3-128 of
the chunk file, sha256 and size of the NAR). See schema/FORMAT.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash
import zstandard

from incstore import atomicfile
from incstore.errors import ChunkCorruptError, ChunkMissingError, ChunkStoreError, ManifestError
from incstore.storepath import NIX32_ALPHABET

CACHE_INFO = "nix-cache-info"
NAR_DIR = "nar"
MANIFEST_DIR = "manifests"
# A key is a store hash part, optionally with a suffix that tells apart two different NARs
# of one store path (non-reproducible builds saved by different workflows).
KEY_RE = re.compile(f"[{NIX32_ALPHABET}]{{32}}(\\.[{NIX32_ALPHABET}]{{8,52}})?")
PRIORITY = 40


@dataclass(frozen=True)
class NarInfo:
    """The fields of a narinfo file that incstore writes and reads back."""

    store_path: str
    url: str
    file_size: int
    nar_hash: str  # "sha256:<nix32>" as narinfo spells it
    nar_size: int
    references: tuple[str, ...]  # base names
    deriver: str | None
    xxh3_128: str
    ca: str | None = None
    sigs: tuple[str, ...] = ()

    def render(self) -> str:
        lines = [
            f"StorePath: {self.store_path}",
            f"URL: {self.url}",
            "Compression: zstd",
            f"FileSize: {self.file_size}",
            f"NarHash: {self.nar_hash}",
            f"NarSize: {self.nar_size}",
            f"References: {' '.join(self.references)}",
        ]
        if self.deriver:
            lines.append(f"Deriver: {self.deriver}")
        lines += [f"Sig: {sig}" for sig in self.sigs]
        if self.ca:
            lines.append(f"CA: {self.ca}")
        lines.append(f"X-Incstore-XXH3-128: {self.xxh3_128}")
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str, key: str) -> NarInfo:
        fields: dict[str, list[str]] = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if not sep:
                raise ChunkStoreError(f"narinfo line is malformed: {line!r}", item=key)
            fields.setdefault(name, []).append(value)

        def one(name: str) -> str:
            if name not in fields:
                raise ChunkStoreError(f"narinfo lacks {name}", item=key)
            return fields[name][0]

        try:
            return cls(
                store_path=one("StorePath"),
                url=one("URL"),
                file_size=int(one("FileSize")),
                nar_hash=one("NarHash"),
                nar_size=int(one("NarSize")),
                references=tuple(one("References").split()),
                deriver=fields.get("Deriver", [None])[0],
                xxh3_128=one("X-Incstore-XXH3-128"),
                ca=fields.get("CA", [None])[0],
                sigs=tuple(fields.get("Sig", [])),
            )
        except ValueError as e:
            raise ChunkStoreError(f"narinfo is malformed: {e}", item=key) from e


@dataclass(frozen=True)
class ChunkDigest:
    """What reading a whole chunk tells: its file size and xxh3, its NAR's sha256 and size."""

    size: int
    xxh3_128: str
    nar_sha256: str
    nar_size: int


def check_key(key: str) -> str:
    if not KEY_RE.fullmatch(key):
        raise ChunkStoreError(f"invalid chunk key {key!r}")
    return key


class ChunkStore:
    """A local directory holding chunks, narinfos and named manifests."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def chunk_path(self, key: str) -> Path:
        return self.root / NAR_DIR / f"{check_key(key)}.nar.zst"

    def narinfo_path(self, key: str) -> Path:
        return self.root / f"{check_key(key)}.narinfo"

    def init(self, store_dir: str) -> None:
        """Create the layout if needed; refuse a store that holds items of another store dir."""
        (self.root / NAR_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / MANIFEST_DIR).mkdir(exist_ok=True)
        info = self.root / CACHE_INFO
        if not info.exists():
            text = f"StoreDir: {store_dir}\nWantMassQuery: 1\nPriority: {PRIORITY}\n"
            atomicfile.write_bytes(info, text.encode())
        self.check_store_dir(store_dir)

    def check_store_dir(self, store_dir: str) -> None:
        try:
            text = (self.root / CACHE_INFO).read_text()
        except FileNotFoundError as e:
            raise ChunkStoreError(
                f"not a chunk store (no {CACHE_INFO})", item=str(self.root)
            ) from e
        lines = text.splitlines()
        found = next((ln.removeprefix("StoreDir: ") for ln in lines if ln.startswith("StoreDir: ")),
                     None)
        if found != store_dir:
            raise ChunkStoreError(
                f"holds items of store {found}, not {store_dir}", item=str(self.root)
            )

    def complete_keys(self) -> set[str]:
        """Keys whose narinfo exists, i.e. complete chunks; one directory listing."""
        try:
            entries = os.scandir(self.root)
        except FileNotFoundError:
            return set()
        with entries:
            return {
                e.name[: -len(".narinfo")]
                for e in entries
                if e.name.endswith(".narinfo") and KEY_RE.fullmatch(e.name[: -len(".narinfo")])
            }

    def read_narinfo(self, key: str) -> NarInfo:
        try:
            text = self.narinfo_path(key).read_text()
        except FileNotFoundError as e:
            raise ChunkMissingError("narinfo is missing from the chunk store", item=key) from e
        return NarInfo.parse(text, key)

    @contextlib.contextmanager
    def write_chunk(self, key: str) -> Iterator[BinaryIO]:
        """Yield a file for the compressed chunk; it appears under its key only on success.

        Chunks are write-once: if the key exists when the file is complete, `AlreadyExists`
        is raised and the existing chunk is left as it is.
        """
        with atomicfile.atomic_writer(self.chunk_path(key), create_only=True) as f:
            yield f

    def inspect(self, key: str, *, item: str | None = None) -> ChunkDigest:
        """Read a whole chunk: its size and xxh3, and the sha256 and size of the NAR inside."""
        xxh = xxhash.xxh3_128()
        sha = hashlib.sha256()
        size = nar_size = 0
        with self.open_chunk(key, item=item) as f:
            dobj = zstandard.ZstdDecompressor().decompressobj()
            try:
                while block := f.read(1 << 20):
                    xxh.update(block)
                    size += len(block)
                    if dobj.eof:
                        raise ChunkCorruptError(f"chunk {key} has data after its frame",
                                                item=item or key)
                    out = dobj.decompress(block)
                    sha.update(out)
                    nar_size += len(out)
            except zstandard.ZstdError as e:
                raise ChunkCorruptError(f"chunk {key} does not decompress: {e}",
                                        item=item or key) from e
            if not dobj.eof:
                raise ChunkCorruptError(f"chunk {key} is truncated", item=item or key)
            if dobj.unused_data:
                raise ChunkCorruptError(f"chunk {key} has data after its frame", item=item or key)
        return ChunkDigest(size, xxh.hexdigest(), sha.hexdigest(), nar_size)

    def quick_digest(self, key: str, *, item: str | None = None) -> tuple[int, str]:
        """Size and XXH3-128 of a chunk file, read once without decompressing it."""
        xxh = xxhash.xxh3_128()
        size = 0
        with self.open_chunk(key, item=item) as f:
            while block := f.read(1 << 20):
                xxh.update(block)
                size += len(block)
        return size, xxh.hexdigest()

    def has_chunk(self, key: str) -> bool:
        return self.chunk_path(key).exists()

    def touch(self, refs: Iterable[Any]) -> None:
        """Renew the mtime of chunks a save reuses (gc's grace period counts from it)."""
        for ref in refs:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.chunk_path(ref.key))

    def chunk_files(self) -> dict[str, os.stat_result]:
        """Every complete-named chunk file with its stat, in one listing."""
        out = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root / NAR_DIR) as entries:
            for e in entries:
                key = e.name.removesuffix(".nar.zst")
                if e.name.endswith(".nar.zst") and KEY_RE.fullmatch(key):
                    out[key] = e.stat()
        return out

    def delete_chunk(self, key: str) -> None:
        """Narinfo first: a chunk without its narinfo is incomplete, never the reverse."""
        for path in (self.narinfo_path(key), self.chunk_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def manifest_path(self, name: str) -> Path:
        from incstore.manifest import check_name  # manifest imports this module

        return self.root / MANIFEST_DIR / f"{check_name(name)}.json"

    def write_manifest(self, name: str, data: bytes) -> None:
        (self.root / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
        atomicfile.write_bytes(self.manifest_path(name), data)

    def manifest_names(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root / MANIFEST_DIR) as es:
            return sorted(e.name.removesuffix(".json") for e in es
                          if e.name.endswith(".json") and not atomicfile.is_temp_name(e.name))
        return []

    def read_manifest(self, name: str) -> bytes:
        try:
            return self.manifest_path(name).read_bytes()
        except FileNotFoundError as e:
            raise ManifestError("no manifest of that name in the chunk store", item=name) from e

    def delete_manifest(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(name).unlink()

    def sweep(self) -> list[str]:
        """Delete temporary files that writers which died left behind."""
        return [name for sub in (self.root, self.root / NAR_DIR, self.root / MANIFEST_DIR)
                for name in atomicfile.sweep(sub)]

    def write_narinfo(self, key: str, info: NarInfo) -> None:
        atomicfile.write_bytes(self.narinfo_path(key), info.render().encode())

    def open_chunk(self, key: str, *, item: str | None = None) -> BinaryIO:
        try:
            return open(self.chunk_path(key), "rb")
        except FileNotFoundError as e:
            raise ChunkMissingError(
                f"chunk {key} is missing from the chunk store {self.root}", item=item or key
            ) from e
