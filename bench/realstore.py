"""Bench store: a realistic Guix store built from this machine's own files.

About 100 items and 300 MB to 1 GB: shared libraries (real ELF), groups of real binaries,
Python module trees with thousands of small files, tiny scripts and `.drv` texts, each item
with symlinks and a file naming the store paths it depends on, all registered in a daemon DB
created from the real Guix schema with their true NAR hashes (through bench/daemondb.py and
bench/narhash.py, not incstore's own modules, which are being rewritten).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

from bench import daemondb, narhash
from bench.daemondb import Registration
from bench.guixstore import canonicalise, store_path

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


class _Store:
    """Where the items of a store under a prefix live."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.store_root = prefix / "gnu" / "store"
        self.default_db = daemondb.db_path(prefix)

    def physical(self, path: str) -> Path:
        return self.prefix / path.lstrip("/")


def _register(store: _Store, path: str, refs: list[str], time: int) -> Registration:
    nar_hash, nar_size = narhash.digest(store.physical(path))
    return Registration(path, nar_hash, nar_size, time, None, tuple(sorted(refs)))


def build(prefix: Path, target_bytes: int, items: int, seed: int = 7) -> list[Registration]:
    """A bench store of about `items` items and `target_bytes` bytes under `prefix`."""
    rng = random.Random(seed)
    store = _Store(prefix)
    store.store_root.mkdir(parents=True, exist_ok=True)
    infos: list[Registration] = []
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
    daemondb.create(store.default_db, infos)
    return infos


def _pick_refs(rng: random.Random, infos: list[Registration]) -> list[str]:
    pool = [i.path for i in infos]
    return sorted(rng.sample(pool, min(len(pool), rng.randint(0, 4))))


def _add(store: _Store, infos: list[Registration], rng: random.Random, name: str,
         sources: list[Path], n: int) -> None:
    path = store_path(rng, name.replace("_", "-")[:60] + "-1.0")
    refs = _pick_refs(rng, infos)
    _copy_item(store.physical(path), sources, refs, path)
    infos.append(_register(store, path, refs, 1_700_000_000 + n))


def _add_text(store: _Store, infos: list[Registration], rng: random.Random, n: int) -> None:
    refs = _pick_refs(rng, infos)
    path = store_path(rng, f"builder-{n}.drv")
    text = "Derive([(\"out\",\"/gnu/store/x\",\"\",\"\")],[" + ",".join(
        f'("{r}",["out"])' for r in refs) + "],[],\"x86_64-linux\",\"/bin/sh\",[],[])"
    physical = store.physical(path)
    physical.write_text(text)
    canonicalise(physical)
    infos.append(_register(store, path, refs, 1_700_000_000 + len(infos)))


def add_update(prefix: Path, count: int, seed: int) -> list[Registration]:
    """A "package update": `count` new items that depend on existing ones, registered live."""
    rng = random.Random(seed)
    store = _Store(prefix)
    pool = sorted(daemondb.references(store.default_db))
    new: list[Registration] = []
    trees = [(n, s) for n, s in candidates(rng) if n.startswith("py-")]
    for i in range(count):
        name, sources = trees[i % len(trees)]
        path = store_path(rng, f"update{seed}-{i}-{name[3:]}"[:60])
        refs = sorted(rng.sample(pool, min(len(pool), rng.randint(0, 4))))
        _copy_item(store.physical(path), sources, refs, path)
        new.append(_register(store, path, refs, 1_800_000_000 + i))
    daemondb.register(store.default_db, new)
    return new
