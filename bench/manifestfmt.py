"""The manifest format as the bench writes it, in one place, so a format change is one edit.

`render` turns synthetic items into manifest bytes exactly as `incstore save` writes them today
(format `incstore-manifest`, version 1: indented JSON with sorted keys, items sorted by path;
see schema/FORMAT.md §6). When incstore moves to a new manifest version, switch `render` (and
`VERSION`); `canary` notices the day they disagree: it saves a three-item store with the real
CLI and compares what incstore wrote with what `render` makes of the same items.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import daemondb, narhash
from bench.daemondb import Registration
from bench.measure import INCSTORE

VERSION = 1


@dataclass(frozen=True)
class Chunk:
    key: str
    size: int
    xxh3_128: str


@dataclass(frozen=True)
class ManifestItem:
    reg: Registration
    chunk: Chunk


def render(items: list[ManifestItem], external: tuple[str, ...] = (),
           created: str = "2025-01-01T00:00:00Z", tool: str = "incstore bench") -> bytes:
    """Manifest bytes (version 1) for `items`, as `incstore save` would write them."""
    doc = {
        "format": "incstore-manifest",
        "version": VERSION,
        "flavour": "guix",
        "store_dir": daemondb.STORE_DIR,
        "created": created,
        "tool": tool,
        "items": [{
            "path": i.reg.path,
            "nar_hash": i.reg.hash,
            "nar_size": i.reg.nar_size,
            "references": sorted(i.reg.references),
            "deriver": i.reg.deriver,
            "registration_time": i.reg.registration_time,
            "derivation_outputs": [{"id": o, "path": p} for o, p in sorted(i.reg.outputs)],
            "chunk": {"key": i.chunk.key, "size": i.chunk.size, "xxh3_128": i.chunk.xxh3_128},
        } for i in sorted(items, key=lambda i: i.reg.path)],
        "external": sorted(external),
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def canary() -> None:
    """Fail loudly if `render` no longer writes what `incstore save` writes."""
    with tempfile.TemporaryDirectory(prefix="incstore-canary-") as tmp:
        prefix = Path(tmp) / "src"
        store = prefix / "gnu/store"
        store.mkdir(parents=True)
        a = "/gnu/store/0123456789abcdfghijklmnpqrsvwxyz-a-1.0"
        drv = "/gnu/store/1123456789abcdfghijklmnpqrsvwxyz-a-1.0.drv"
        b = "/gnu/store/2123456789abcdfghijklmnpqrsvwxyz-b-1.0"
        (store / a[11:]).write_text(f"a {a}\n")
        (store / drv[11:]).write_text(f'Derive([("out","{a}","","")],[],[],"x","y",[],[])')
        (store / b[11:]).mkdir()
        (store / b[11:] / "f").write_text(f"b {a}\n")
        regs = []
        for n, (path, refs, deriver, outs) in enumerate([
                (a, (a,), drv, ()), (drv, (), None, (("out", a),)), (b, (a,), None, ())]):
            nar_hash, nar_size = narhash.digest(store / path[len("/gnu/store/"):])
            regs.append(Registration(path, nar_hash, nar_size, 1_700_000_000 + n, deriver,
                                     refs, outs))
        daemondb.create(daemondb.db_path(prefix), regs)
        manifest = Path(tmp) / "m.json"
        subprocess.run([*INCSTORE, "save", "--db", str(daemondb.db_path(prefix)), "--prefix",
                        str(prefix), "--cache", f"{tmp}/cache", "--manifest", str(manifest)],
                       check=True, capture_output=True, cwd="/")
        written = json.loads(manifest.read_bytes())
        chunks = {i["path"]: Chunk(**i["chunk"]) for i in written.get("items", [])
                  if isinstance(i, dict) and "chunk" in i}
        ours = render([ManifestItem(r, chunks.get(r.path, Chunk("", 0, ""))) for r in regs],
                      created=written.get("created", ""), tool=written.get("tool", ""))
        if json.loads(ours) != written:
            raise SystemExit(
                f"bench/manifestfmt.py writes manifest version {VERSION}, but incstore save "
                f"now writes version {written.get('version')!r} (or another layout): switch "
                "manifestfmt.render to the new format")


if __name__ == "__main__":
    canary()
    print("manifest format canary: bench and incstore agree")
