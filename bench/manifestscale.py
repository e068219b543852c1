"""Manifest scale: how incstore's manifest-wide commands cope with a 200,000-item manifest.

Synthesises, cheaply, a valid manifest of N items and the chunk store it names, then times
`incstore restore --dry-run --manifest M --prefix EMPTY`, `incstore check` and `incstore stats`
(median of `reps`, with peak memory), then once each a real restore of every item into tmpfs
and a no-op restore over it.

Why not `incstore save` on a synthetic store of 200k tiny single-file items: it would need 200k
files in a store plus a daemon DB, and then a save that (at the per-item cost the growth curve
measures, about a millisecond an item) takes minutes more; and the save path is exactly what
is being rewritten. Here each item's NAR is made in memory (one small regular file naming its
store path), hashed, compressed into a real one-frame zstd chunk with its XXH3-128, and only
the chunk file is written: so `check` reads and verifies real chunks, and `check --full` would
pass too. The manifest comes from `manifestfmt.render`, in the format version that the timed
incstore writes (its canary finds out, and tells when `render` must learn a new one). No
narinfo files are written: none of the three commands reads them (a later `save` into this
chunk store would treat its chunks as incomplete and write them again).

Items mimic a Guix store's graph: `.drv` items naming input `.drv`s and sources with their
DerivationOutputs, outputs naming their deriver and referencing earlier outputs (and often
themselves), sources and builders referencing a few outputs; references always point to
earlier items, so the manifest is closed. The result is cached under bench/out/manifest-scale/.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import xxhash
import zstandard

from bench import guixstore, manifestfmt
from bench.daemondb import Registration
from bench.manifestfmt import Chunk, ManifestItem
from bench.measure import INCSTORE, Row, timed, wipe

NAME = "scale"


def _nar_of_file(data: bytes) -> bytes:
    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)

    return (s(b"nix-archive-1") + s(b"(") + s(b"type") + s(b"regular") + s(b"contents")
            + s(data) + s(b")"))


@dataclass(frozen=True)
class Synthetic:
    root: Path
    manifest: Path
    cache: Path
    items: int
    version: int
    manifest_bytes: int
    seconds: float


def synthesise(n: int, version: int, seed: int = 7) -> Synthetic:
    """The manifest (format `version`) and chunk store of `n` items (built once, reused)."""
    root = guixstore.OUT / "manifest-scale" / f"{n}-s{seed}-v{version}"
    manifest, cache = root / "manifest.json", root / "cache"
    if not manifest.exists():
        start = time.perf_counter()
        tmp = root.with_name(root.name + ".tmp")
        wipe(tmp)
        (tmp / "cache" / "nar").mkdir(parents=True)
        (tmp / "cache" / "manifests").mkdir()
        (tmp / "cache" / "nix-cache-info").write_text(
            "StoreDir: /gnu/store\nWantMassQuery: 1\nPriority: 40\n")
        items = _items(n, seed, tmp / "cache" / "nar")
        data = manifestfmt.render(items, version, name=NAME)
        (tmp / "cache" / "manifests" / f"{NAME}.json").write_bytes(data)
        os.link(tmp / "cache" / "manifests" / f"{NAME}.json", tmp / "manifest.json")
        (tmp / "seconds").write_text(f"{time.perf_counter() - start:.1f}")
        wipe(root)
        os.rename(tmp, root)
    return Synthetic(root, manifest, cache, n, version, manifest.stat().st_size,
                     float((root / "seconds").read_text()))


def _items(n: int, seed: int, nar_dir: Path) -> list[ManifestItem]:
    rng = random.Random(f"{seed}/manifest-scale")
    cctx = zstandard.ZstdCompressor(level=2, write_checksum=True)
    names = guixstore.POOLS.packages
    outputs: list[str] = []
    drvs: list[str] = []
    items: list[ManifestItem] = []
    pending_outputs: list[tuple[str, str]] = []  # (output path, its .drv) not yet made

    def pick(pool: list[str], lo: int, hi: int) -> list[str]:
        if not pool:
            return []
        recent = pool[-300:]
        return sorted({rng.choice(recent) if rng.random() < 0.6 else rng.choice(pool)
                       for _ in range(rng.randint(lo, hi))})

    def add(path: str, refs: list[str], deriver: str | None = None,
            outs: tuple[tuple[str, str], ...] = ()) -> None:
        text = (f"{path}\n" + "\n".join(refs) + "\n").encode() * rng.randint(1, 6)
        nar = _nar_of_file(text)
        chunk = cctx.compress(nar)
        key = path[len("/gnu/store/"):][:32]
        (nar_dir / f"{key}.nar.zst").write_bytes(chunk)
        reg = Registration(path, "sha256:" + hashlib.sha256(nar).hexdigest(), len(nar),
                           guixstore.T0 + len(items), deriver, tuple(sorted(set(refs))), outs)
        items.append(ManifestItem(reg, Chunk(key, len(chunk), xxhash.xxh3_128_hexdigest(chunk)),
                                  seen=guixstore.T0))

    while len(items) < n:
        name, ver = rng.choice(names)
        kind = rng.random()
        if pending_outputs and kind < 0.30:
            out, drv = pending_outputs.pop(rng.randrange(len(pending_outputs)))
            refs = pick(outputs, 1, 6) + ([out] if rng.random() < 0.4 else [])
            add(out, refs, deriver=drv)
            outputs.append(out)
        elif kind < 0.75:
            out = guixstore.store_path(rng, f"{name}-{ver}")
            drv = guixstore.store_path(rng, f"{name}-{ver}.drv")
            add(drv, pick(drvs, 2, 14) + pick(outputs[-50:], 0, 2), outs=(("out", out),))
            drvs.append(drv)
            if rng.random() < 0.6:
                pending_outputs.append((out, drv))
        else:
            suffix = rng.choice(["-builder", "-guile-builder", ".patch", ".scm", "-source"])
            path = guixstore.store_path(rng, f"{name}-{ver}{suffix}")
            add(path, pick(outputs, 0, 3))
            outputs.append(path)
    return items


def run(n: int, reps: int, shm_dir: Path) -> tuple[Synthetic, list[Row]]:
    """Time restore --dry-run, check and stats on the synthetic manifest of `n` items."""
    syn = synthesise(n, manifestfmt.canary())
    empty = Path(os.path.join(shm_dir, f"incstore-manifest-scale-{os.getpid()}"))
    wipe(empty)
    commands = {
        "restore --dry-run, empty prefix": [*INCSTORE, "restore", "--dry-run", "--manifest",
                                            str(syn.manifest), "--cache", str(syn.cache),
                                            "--prefix", str(empty)],
        "check (named manifests)": [*INCSTORE, "check", "--cache", str(syn.cache)],
        "stats": [*INCSTORE, "stats", "--cache", str(syn.cache)],
    }
    rows = []
    for label, cmd in commands.items():
        row = Row(label, "disk", items=n)
        for _ in range(reps):
            os.sync()
            row.ours.append(timed(cmd))
        rows.append(row)
    # the real thing, once (minutes): every item extracted into tmpfs and registered in a new
    # DB, then the same restore again, which finds everything present
    restore = [c for c in commands["restore --dry-run, empty prefix"] if c != "--dry-run"]
    for label in ("restore, empty prefix (tmpfs)", "no-op restore (tmpfs)"):
        row = Row(label, "shm", items=n)
        row.ours.append(timed(restore))
        rows.append(row)
    wipe(empty)
    return syn, rows


def report(syn: Synthetic, rows: list[Row], timed: str = "") -> str:
    lines = [f"# Manifest scale: {syn.items:,} items", "", f"incstore: {timed}", "",
             f"Manifest {syn.manifest_bytes:,} bytes (format version {syn.version}), "
             f"{syn.items:,} chunks; synthesised in {syn.seconds:.0f} s (cached since).", "",
             "| command | median s | runs s | peak MB |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.scenario} | {Row.med(r.ours):.2f} | "
                     f"{' '.join(f'{s.seconds:.2f}' for s in r.ours)} | "
                     f"{Row.peak(r.ours):.0f} |")
    return "\n".join(lines) + "\n"

