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
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from incstore import frame
from incstore.backend import Backend, Entry, Reader, open_backend
from incstore.errors import ChunkCorruptError, ChunkMissingError, ChunkStoreError, ManifestError
from incstore.manifest import MAX_BYTES as MANIFEST_MAX_BYTES
from incstore.manifest import NAME_RE, Manifest, check_name, parse_stream
from incstore.storepath import KEY_RE, nix32_encode

CACHE_INFO = "nix-cache-info"
NAR_DIR = "nar"
MANIFEST_DIR = "manifests"
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


def signed_fields(text: str) -> dict[str, str]:
    """A Guix narinfo's signed fields (those before any `Signature:`), first value of each."""
    fields: dict[str, str] = {}
    for line in text.split("Signature:", 1)[0].splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            fields.setdefault(name, value)
    return fields


def describes(text: str, path: str, nar_hash: str, nar_size: int,
              references: tuple[str, ...]) -> bool:
    """Whether a narinfo's signed fields say exactly this of an item: its path, NAR hash
    (`sha256:<hex>` as the DB has it), NAR size and references."""
    fields = signed_fields(text)
    digest = "sha256:" + nix32_encode(bytes.fromhex(nar_hash.removeprefix("sha256:")))
    return (fields.get("StorePath") == path and fields.get("NarHash") == digest
            and fields.get("NarSize") == str(nar_size)
            and sorted(fields.get("References", "").split())
            == sorted(r.rsplit("/", 1)[1] for r in references))


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


PENDING_DIR = f"{MANIFEST_DIR}/pending"
QUARANTINE_DIR = "quarantine"
UPSTREAM_DIR = "guix"  # upstream Guix narinfos, kept beside the chunks of their items
SIG_SUFFIX = ".sig"  # a manifest's detached signature: manifests/<name>.json.sig


class ChunkStore:
    """Chunks, narinfos and named manifests on a backend (a local directory or S3)."""

    def __init__(self, location: str | Path | Backend, *, fsync: bool = False) -> None:
        self.backend = location if isinstance(location, Backend) else open_backend(location)
        self.backend.fsync = fsync

    @property
    def url(self) -> str:
        return self.backend.url

    @staticmethod
    def chunk_name(key: str) -> str:
        return f"{NAR_DIR}/{check_key(key)}.nar.zst"

    @staticmethod
    def narinfo_name(key: str) -> str:
        return f"{check_key(key)}.narinfo"

    @staticmethod
    def manifest_name(name: str) -> str:
        return f"{MANIFEST_DIR}/{check_name(name)}.json"

    # local paths, for tools and tests that look at the files themselves
    def chunk_path(self, key: str) -> Path:
        return self.backend.local_path(self.chunk_name(key))

    def narinfo_path(self, key: str) -> Path:
        return self.backend.local_path(self.narinfo_name(key))

    def manifest_path(self, name: str) -> Path:
        return self.backend.local_path(self.manifest_name(name))

    def init(self, store_dir: str) -> None:
        """Create the layout if needed; refuse a store that holds items of another store dir."""
        if self.backend.stat(CACHE_INFO) is None:
            text = f"StoreDir: {store_dir}\nWantMassQuery: 1\nPriority: {PRIORITY}\n"
            self.backend.write(CACHE_INFO, text.encode())
        self.check_store_dir(store_dir)

    def exists(self) -> bool:
        return self.backend.stat(CACHE_INFO) is not None

    def check_store_dir(self, store_dir: str) -> None:
        try:
            text = self.backend.read(CACHE_INFO).decode()
        except FileNotFoundError as e:
            raise ChunkStoreError(f"not a chunk store (no {CACHE_INFO})", item=self.url) from e
        except UnicodeDecodeError:
            raise ChunkStoreError(f"{CACHE_INFO} is not UTF-8 text", item=self.url) from None
        lines = text.splitlines()
        found = next((ln.removeprefix("StoreDir: ") for ln in lines if ln.startswith("StoreDir: ")),
                     None)
        if found != store_dir:
            raise ChunkStoreError(f"holds items of store {found}, not {store_dir}", item=self.url)

    def narinfo_keys(self) -> set[str]:
        return {name.removesuffix(".narinfo") for name in self.backend.names("")
                if name.endswith(".narinfo") and KEY_RE.fullmatch(name[: -len(".narinfo")])}

    def complete_keys(self) -> set[str]:
        """Keys with both their narinfo and their chunk: two listings, none per item."""
        return self.narinfo_keys() & set(self.chunk_files())

    def read_narinfo(self, key: str) -> NarInfo:
        try:
            text = self.backend.read(self.narinfo_name(key)).decode()
        except FileNotFoundError as e:
            raise ChunkMissingError("narinfo is missing from the chunk store", item=key) from e
        except UnicodeDecodeError:
            raise ChunkStoreError("narinfo is not UTF-8 text", item=key) from None
        return NarInfo.parse(text, key)

    def write_narinfo(self, key: str, info: NarInfo) -> None:
        self.backend.write(self.narinfo_name(key), info.render().encode())

    def write_chunk(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A file for the compressed chunk; it appears under its key only on success.

        Chunks are write-once: if the key exists when the file is complete, `AlreadyExists`
        is raised and the existing chunk is left as it is.
        """
        return self.backend.create(self.chunk_name(key))

    def open_chunk(self, key: str, *, item: str | None = None) -> Reader:
        try:
            return self.backend.open(self.chunk_name(key))
        except FileNotFoundError as e:
            raise ChunkMissingError(
                f"chunk {key} is missing from the chunk store {self.url}", item=item or key
            ) from e
        except ChunkStoreError as e:
            # name the item, not the chunk store (the backend's error names the store)
            raise ChunkStoreError(f"chunk {key}: {e}", item=item or key) from e

    def inspect(self, key: str, *, item: str | None = None, nar_size: int | None = None,
                size: int | None = None) -> ChunkDigest:
        """Read a whole chunk: its size and xxh3, and the sha256 and size of the NAR inside.

        Memory stays bounded whatever the chunk holds: the NAR is read through in 1 MiB
        pieces, the decoder's window is capped, and reading stops once the NAR exceeds
        `nar_size`, or the file its recorded `size` (when given). A chunk that is not exactly
        one zstd frame with a content checksum is corrupt.
        """
        import xxhash
        import zstandard

        label = item or key
        xxh = xxhash.xxh3_128()
        sha = hashlib.sha256()
        found = nar_found = 0
        head = b""
        tracker = frame.FrameEnd()
        f = self.open_chunk(key, item=item)

        def corrupt(why: str) -> ChunkCorruptError:
            return ChunkCorruptError(f"chunk {key} {why}", item=label)

        class Counting:
            def read(self, n: int = -1) -> bytes:
                nonlocal found, head
                limit = (size + 1 - found) if size is not None else n
                block = f.read(n if size is None else max(0, min(n, limit)) if n >= 0 else limit)
                xxh.update(block)
                found += len(block)
                if size is not None and found > size:
                    raise corrupt(f"is longer than its recorded {size} bytes")
                if len(head) < frame.HEADER_BYTES:
                    head += block[: frame.HEADER_BYTES - len(head)]
                    if len(head) >= frame.HEADER_BYTES or not block:
                        problem = frame.header_problem(head, nar_size)
                        if problem:
                            raise corrupt(problem)
                tracker.feed(block)
                if tracker.broken or tracker.trailing:
                    raise corrupt("has data after its zstd frame" if tracker.trailing
                                  else f"is not one zstd frame ({tracker.broken})")
                return block

        try:
            reader = frame.decompressor().stream_reader(
                Counting(), read_across_frames=False)  # type: ignore[arg-type]
            try:
                while block := reader.read(1 << 20):
                    sha.update(block)
                    nar_found += len(block)
                    if nar_size is not None and nar_found > nar_size:
                        raise corrupt(f"decompresses to more than the {nar_size} bytes "
                                      "recorded")
                while Counting().read(1 << 20):  # the rest of the file, for its xxh3
                    pass
            except zstandard.ZstdError as e:
                raise corrupt(f"does not decompress: {e}") from e
        finally:
            f.close()
        return ChunkDigest(found, xxh.hexdigest(), sha.hexdigest(), nar_found)

    def quick_digest(self, key: str, *, item: str | None = None, size: int | None = None
                     ) -> tuple[int, str]:
        """Size and XXH3-128 of a chunk file, read once without decompressing it, and no
        further than one byte past its recorded `size` (when given)."""
        import xxhash

        xxh = xxhash.xxh3_128()
        found = 0
        f = self.open_chunk(key, item=item)
        try:
            while block := f.read(1 << 20 if size is None else min(1 << 20, size + 1 - found)):
                xxh.update(block)
                found += len(block)
                if size is not None and found > size:
                    break
        finally:
            f.close()
        return found, xxh.hexdigest()

    def chunk_files(self) -> dict[str, Entry]:
        """Every chunk with its size and mtime: one listing of `nar/`."""
        return {e.name.removesuffix(".nar.zst"): e for e in self.backend.listdir(NAR_DIR)
                if e.name.endswith(".nar.zst") and KEY_RE.fullmatch(e.name[: -len(".nar.zst")])}

    def chunk_keys(self) -> list[str]:
        """The key of every chunk, sorted: one listing, no status per file."""
        return sorted(name[: -len(".nar.zst")] for name in self.backend.names(NAR_DIR)
                      if name.endswith(".nar.zst") and KEY_RE.fullmatch(name[: -len(".nar.zst")]))

    def chunk_bytes(self) -> int:
        """The bytes of every chunk, summed as the listing goes."""
        return sum(e.size for e in self.backend.scan(NAR_DIR)
                   if e.name.endswith(".nar.zst") and KEY_RE.fullmatch(e.name[: -len(".nar.zst")]))

    def quarantine(self, key: str) -> bool:
        """Move a chunk found not to hold its item's NAR aside (`quarantine/`) and delete its
        narinfo, so that the next save writes the item again; False if it was gone."""
        aside = f"{QUARANTINE_DIR}/{check_key(key)}.{int(time.time())}.{os.urandom(3).hex()}.zst"
        moved = self.backend.move(self.chunk_name(key), aside)
        self.backend.delete(self.narinfo_name(key))
        return moved

    def quarantined(self) -> list[Entry]:
        return self.backend.listdir(QUARANTINE_DIR)

    def renew_chunk(self, key: str) -> os.stat_result | None:
        """Renew the mtime of a chunk a save reuses, where the backend can (gc's grace period
        counts from it; see schema/FORMAT.md, garbage collection); the chunk file's status
        after that, where it is a local file."""
        return self.backend.renew(self.chunk_name(key))

    def sweep_chunk(self, key: str, cutoff: float) -> bool:
        """Delete a chunk whose mtime is before `cutoff`, checked atomically where the backend
        can; its narinfo goes after it (a narinfo without its chunk reads as not stored)."""
        if not self.backend.delete_if_older(self.chunk_name(key), cutoff):
            return False
        self.backend.delete(self.narinfo_name(key))
        self.backend.delete(self.upstream_name(key))
        return True

    def manifests(self) -> dict[str, Entry]:
        """Named manifests with their size and last save (mtime): one listing."""
        return {e.name.removesuffix(".json"): e for e in self.backend.listdir(MANIFEST_DIR)
                if e.name.endswith(".json") and NAME_RE.fullmatch(e.name[: -len(".json")])}

    def manifest_names(self) -> list[str]:
        return sorted(self.manifests())

    def write_manifest(self, name: str, data: bytes) -> None:
        self.backend.write(self.manifest_name(name), data, durable=True)

    def read_manifest(self, name: str) -> bytes:
        """A named manifest's bytes (refused beyond the size any manifest may have)."""
        try:
            f = self.backend.open(self.manifest_name(name))
        except FileNotFoundError as e:
            raise ManifestError("no manifest of that name in the chunk store", item=name) from e
        try:
            data = f.read(MANIFEST_MAX_BYTES + 1)
        except OSError as e:
            raise ChunkStoreError(f"cannot read manifest: {e.strerror or e}", item=name) from e
        finally:
            f.close()
        if len(data) > MANIFEST_MAX_BYTES:
            raise ManifestError(f"manifest is larger than {MANIFEST_MAX_BYTES} bytes", item=name)
        return data

    def load_manifest(self, name: str) -> Manifest:
        """Parse a named manifest as it is read (never holding its bytes whole)."""
        try:
            f = self.backend.open(self.manifest_name(name))
        except FileNotFoundError as e:
            raise ManifestError("no manifest of that name in the chunk store", item=name) from e
        try:
            return parse_stream(f.read, name)
        except OSError as e:
            raise ChunkStoreError(f"cannot read manifest: {e.strerror or e}", item=name) from e
        finally:
            f.close()

    def read_manifest_sig(self, name: str) -> bytes | None:
        """The detached signature beside a named manifest, if there is one."""
        try:
            return self.backend.read(self.manifest_name(name) + SIG_SUFFIX)
        except (FileNotFoundError, ChunkStoreError):
            return None

    def write_manifest_sig(self, name: str, data: bytes) -> None:
        self.backend.write(self.manifest_name(name) + SIG_SUFFIX, data, durable=True)

    def upstream_name(self, key: str) -> str:
        return f"{UPSTREAM_DIR}/{check_key(key)}.narinfo"

    def upstream_keys(self) -> set[str]:
        """Keys whose item has an upstream narinfo kept: one listing."""
        return {name.removesuffix(".narinfo") for name in self.backend.names(UPSTREAM_DIR)
                if name.endswith(".narinfo") and KEY_RE.fullmatch(name[: -len(".narinfo")])}

    def write_upstream_narinfo(self, key: str, text: str) -> None:
        """Keep the signed narinfo the substitute server gave for this chunk's item (Guix)."""
        self.backend.write(self.upstream_name(key), text.encode())

    def has_manifest(self, name: str) -> bool:
        return self.backend.stat(self.manifest_name(name)) is not None

    def delete_manifest(self, name: str) -> None:
        self.backend.delete(self.manifest_name(name))
        self.backend.delete(self.manifest_name(name) + SIG_SUFFIX)

    def write_pending(self, keys: Iterable[str]) -> str:
        """Announce the chunks a running save will name, before it writes or reuses any, so that
        a gc running meanwhile keeps them. Returns the pending record's name."""
        name = f"{PENDING_DIR}/{os.getpid()}-{os.urandom(6).hex()}.json"
        self.backend.write(name, json.dumps(sorted(set(keys))).encode())
        return name

    def pending(self) -> dict[str, tuple[Entry, set[str]]]:
        """Pending records of saves (see `write_pending`), with the keys each announces."""
        out = {}
        for e in self.backend.listdir(PENDING_DIR):
            name = f"{PENDING_DIR}/{e.name}"
            with contextlib.suppress(FileNotFoundError, ValueError):
                out[name] = (e, set(json.loads(self.backend.read(name))))
        return out

    def drop_pending(self, name: str) -> None:
        self.backend.delete(name)

    def sweep(self) -> list[str]:
        """Delete temporary files that writers which died left behind."""
        return self.backend.sweep()
