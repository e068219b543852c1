"""The manifest format as the bench writes it, in one place, so a format change is one edit.

`render` turns synthetic items into manifest bytes exactly as `incstore save` writes them, in
either format version (schema/FORMAT.md §6):

- version 1: indented JSON with sorted keys, one object per item, items sorted by path;
- version 2: the header first, then `items` last, one compact JSON array per item and per
  line, references as indices into items followed by `external`.

`canary` saves a three-item store with the real CLI (of whichever incstore is being timed),
checks that `render` makes the same document of the same items, and returns the version that
incstore writes, so the bench follows a format change by itself; when a version 3 appears it
says so and `render` is the one function to extend.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import daemondb, narhash
from bench.daemondb import Registration
from bench.measure import INCSTORE

VERSIONS = (1, 2)


@dataclass(frozen=True)
class Chunk:
    key: str
    size: int
    xxh3_128: str


@dataclass(frozen=True)
class ManifestItem:
    reg: Registration
    chunk: Chunk
    seen: int = 0  # version 2: last save in which the item was valid


def render(items: list[ManifestItem], version: int, external: tuple[str, ...] = (),
           created: str = "2025-01-01T00:00:00Z", tool: str = "incstore bench",
           name: str | None = None) -> bytes:
    """Manifest bytes for `items`, as `incstore save` of that format version writes them."""
    ordered = sorted(items, key=lambda i: i.reg.path)
    if version == 1:
        doc = {
            "format": "incstore-manifest", "version": 1, "flavour": "guix",
            "store_dir": daemondb.STORE_DIR, "created": created, "tool": tool,
            "items": [{
                "path": i.reg.path,
                "nar_hash": i.reg.hash,
                "nar_size": i.reg.nar_size,
                "references": sorted(i.reg.references),
                "deriver": i.reg.deriver,
                "registration_time": i.reg.registration_time,
                "derivation_outputs": [{"id": o, "path": p} for o, p in sorted(i.reg.outputs)],
                "chunk": {"key": i.chunk.key, "size": i.chunk.size,
                          "xxh3_128": i.chunk.xxh3_128},
            } for i in ordered],
            "external": sorted(external),
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    if version == 2:
        ext = sorted(external)
        index = {p: n for n, p in enumerate([i.reg.path for i in ordered] + ext)}
        head = json.dumps({"format": "incstore-manifest", "version": 2, "flavour": "guix",
                           "store_dir": daemondb.STORE_DIR, "name": name, "created": created,
                           "tool": tool, "external": ext}, sort_keys=True,
                          separators=(",", ":"))
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        lines = ",\n".join(dumps([
            i.reg.path, i.reg.hash, i.reg.nar_size,
            sorted(index[r] for r in set(i.reg.references)), i.reg.deriver,
            i.reg.registration_time, [list(o) for o in sorted(i.reg.outputs)], i.chunk.key,
            i.chunk.size, i.chunk.xxh3_128, i.seen, None]) for i in ordered)
        return f'{head[:-1]},"items":[\n{lines}\n]}}\n'.encode()
    raise SystemExit(f"bench/manifestfmt.py cannot write manifest version {version}: extend "
                     "manifestfmt.render")


def _chunk_and_seen(doc: dict[str, Any], version: int) -> dict[str, tuple[Chunk, int]]:
    """What only the save can know (chunk sizes and hashes, the save time), by path."""
    out: dict[str, tuple[Chunk, int]] = {}
    for item in doc.get("items", []):
        if version == 1 and isinstance(item, dict) and isinstance(item.get("chunk"), dict):
            out[item["path"]] = (Chunk(**item["chunk"]), 0)
        elif version == 2 and isinstance(item, list) and len(item) == 12:
            out[item[0]] = (Chunk(item[7], item[8], item[9]), item[10])
    return out


def canary() -> int:
    """The manifest version the timed incstore writes; fails loudly if `render` does not
    write the same document."""
    with tempfile.TemporaryDirectory(prefix="incstore-canary-") as tmp:
        prefix = Path(tmp) / "src"
        store = prefix / "gnu/store"
        store.mkdir(parents=True)
        a = "/gnu/store/0123456789abcdfghijklmnpqrsvwxyz-a-1.0"
        drv = "/gnu/store/1123456789abcdfghijklmnpqrsvwxyz-a-1.0.drv"
        b = "/gnu/store/2123456789abcdfghijklmnpqrsvwxyz-b-1.0"
        base = len("/gnu/store/")
        (store / a[base:]).write_text(f"a {a}\n")
        (store / drv[base:]).write_text(f'Derive([("out","{a}","","")],[],[],"x","y",[],[])')
        (store / b[base:]).mkdir()
        (store / b[base:] / "f").write_text(f"b {a}\n")
        regs = []
        for n, (path, refs, deriver, outs) in enumerate([
                (a, (a,), drv, ()), (drv, (), None, (("out", a),)), (b, (a,), None, ())]):
            nar_hash, nar_size = narhash.digest(store / path[base:])
            regs.append(Registration(path, nar_hash, nar_size, 1_700_000_000 + n, deriver,
                                     refs, outs))
        daemondb.create(daemondb.db_path(prefix), regs)
        manifest = Path(tmp) / "m.json"
        subprocess.run([*INCSTORE, "save", "--db", str(daemondb.db_path(prefix)), "--prefix",
                        str(prefix), "--cache", f"{tmp}/cache", "--manifest", str(manifest)],
                       check=True, capture_output=True, cwd="/")
        written = json.loads(manifest.read_bytes())
        version = written.get("version")
        if version not in VERSIONS:
            raise SystemExit(f"incstore save writes manifest version {version!r}, which "
                             "bench/manifestfmt.py cannot write yet: extend manifestfmt.render")
        saved = _chunk_and_seen(written, version)
        ours = render([ManifestItem(r, *saved.get(r.path, (Chunk("", 0, ""), 0))) for r in regs],
                      version, created=written.get("created", ""),
                      tool=written.get("tool", ""), name=written.get("name"))
        if json.loads(ours) != written:
            raise SystemExit(f"bench/manifestfmt.py no longer writes manifest version {version} "
                             "as incstore save does: update manifestfmt.render")
        return int(version)


if __name__ == "__main__":
    print(f"manifest format canary: incstore writes version {canary()}, and so does the bench")
