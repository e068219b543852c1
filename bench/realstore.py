"""Bench store: a realistic Guix store built from this machine's own files.

About 100 items and 300 MB to 1 GB: shared libraries (real ELF), groups of real binaries,
Python module trees with thousands of small files, tiny scripts and `.drv` texts, each item
with symlinks and a file naming the store paths it depends on, all registered in a daemon DB
created from the real Guix schema with their true NAR hashes.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

from incstore import db, nar
from incstore.db import PathInfo
from incstore.sample import new_store_path
from incstore.store import Store, canonicalise

LIB_DIRS = [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu")]
BIN_DIRS = [Path("/usr/bin")]


def _python_trees() -> list[Path]:
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    trees = [p for p in sorted((site / "site-packages").iterdir()) if p.is_dir()
             and not p.name.endswith((".dist-info", ".egg-info")) and p.name != "__pycache__"]
    trees += [p for p in sorted(site.iterdir()) if p.is_dir() and p.name not in
              ("site-packages", "test", "__pycache__", "config-3.11-x86_64-linux-gnu")]
    return trees


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def candidates(rng: random.Random) -> list[tuple[str, list[Path]]]:
    """(name, sources) for every item the bench store can hold, in a stable shuffled order."""
    out: list[tuple[str, list[Path]]] = []
    for lib_dir in LIB_DIRS:
        if lib_dir.is_dir():
            libs = sorted(p for p in lib_dir.iterdir() if p.is_file() and not p.is_symlink()
                          and ".so" in p.name and p.stat().st_size > 200_000)
            out += [(f"lib-{p.name.split('.so')[0]}", [p]) for p in libs]
    bins = sorted(p for d in BIN_DIRS if d.is_dir() for p in d.iterdir()
                  if p.is_file() and not p.is_symlink() and p.stat().st_size > 100_000)
    out += [(f"tools-{i}", bins[i : i + 6]) for i in range(0, len(bins), 6)]
    out += [(f"py-{p.name}", [p]) for p in _python_trees()]
    rng.shuffle(out)
    return out


def _copy_item(dest: Path, sources: list[Path], refs: list[str], path: str) -> None:
    dest.mkdir()
    for src in sources:
        if src.is_dir():
            shutil.copytree(src, dest / src.name, symlinks=True,
                            ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))
        else:
            sub = dest / ("lib" if ".so" in src.name else "bin")
            sub.mkdir(exist_ok=True)
            shutil.copy2(src, sub / src.name)
            link = sub / (src.name.split(".so")[0] + ".so")
            if ".so" in src.name and not link.exists():
                os.symlink(src.name, link)
    support = dest / "nix-support"
    support.mkdir()
    (support / "propagated-inputs").write_text("\n".join(refs) + "\n")
    if refs:
        os.symlink(refs[0], support / "first-input")
    canonicalise(dest)


def _register(store: Store, path: str, refs: list[str], time: int) -> PathInfo:
    digest = nar.dump_hashed(store.physical(path))
    return PathInfo(path, digest.db_hash, digest.size, time, None, tuple(sorted(refs)))


def build(prefix: Path, target_bytes: int, items: int, seed: int = 7) -> list[PathInfo]:
    """A bench store of about `items` items and `target_bytes` bytes under `prefix`."""
    rng = random.Random(seed)
    store = Store(prefix, db.GUIX)
    store.store_root.mkdir(parents=True, exist_ok=True)
    infos: list[PathInfo] = []
    budget = target_bytes
    small = max(4, items // 6)  # tiny .drv texts and scripts, as a real store has many
    for name, sources in candidates(rng):
        if len(infos) >= items - small or budget <= 0:
            break
        size = sum(_size(s) for s in sources)
        if size > budget or size > target_bytes // 6:
            continue
        if size < target_bytes // (items * (12 if name.startswith("py-") else 3)):
            continue  # plenty of small items come below; spend the item count on real weight
        budget -= size
        _add(store, infos, rng, name, sources, len(infos))
    for n in range(small):
        _add_text(store, infos, rng, n)
    db_path = store.default_db
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db.create(db_path, db.GUIX, infos)
    return infos


def _pick_refs(rng: random.Random, infos: list[PathInfo]) -> list[str]:
    pool = [i.path for i in infos]
    return sorted(rng.sample(pool, min(len(pool), rng.randint(0, 4))))


def _add(store: Store, infos: list[PathInfo], rng: random.Random, name: str,
         sources: list[Path], n: int) -> None:
    path = new_store_path(rng, db.GUIX, name.replace("_", "-")[:60] + "-1.0")
    refs = _pick_refs(rng, infos)
    _copy_item(store.physical(path), sources, refs, path)
    infos.append(_register(store, path, refs, 1_700_000_000 + n))


def _add_text(store: Store, infos: list[PathInfo], rng: random.Random, n: int) -> None:
    refs = _pick_refs(rng, infos)
    path = new_store_path(rng, db.GUIX, f"builder-{n}.drv")
    text = "Derive([(\"out\",\"/gnu/store/x\",\"\",\"\")],[" + ",".join(
        f'("{r}",["out"])' for r in refs) + "],[],\"x86_64-linux\",\"/bin/sh\",[],[])"
    physical = store.physical(path)
    physical.write_text(text)
    canonicalise(physical)
    infos.append(_register(store, path, refs, 1_700_000_000 + len(infos)))


def add_update(prefix: Path, count: int, seed: int) -> list[PathInfo]:
    """A "package update": `count` new items that depend on existing ones, registered live."""
    rng = random.Random(seed)
    store = Store(prefix, db.GUIX)
    existing = db.read_snapshot(store.default_db).infos
    pool = list(existing.values())
    new: list[PathInfo] = []
    trees = [(n, s) for n, s in candidates(rng) if n.startswith("py-")]
    for i in range(count):
        name, sources = trees[i % len(trees)]
        path = new_store_path(rng, db.GUIX, f"update{seed}-{i}-{name[3:]}"[:60])
        refs = _pick_refs(rng, pool)
        _copy_item(store.physical(path), sources, refs, path)
        new.append(_register(store, path, refs, 1_800_000_000 + i))
    db.register_in_place(store.default_db, db.GUIX, new)
    return new
