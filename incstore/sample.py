"""Sample store: a generated, Guix- or Nix-shaped store with a real daemon DB, for the demo,
the tests and the benchmark.

Items are real file trees (text, "binaries", executables, nested module trees, relative and
absolute symlinks, empty files and directories) whose files name the store paths they depend
on, registered in a DB created from the daemon's own schema with their real NAR hashes,
references (self-references included) and, for `.drv` items, DerivationOutputs rows.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from incstore import db, nar
from incstore.db import Flavour, PathInfo
from incstore.store import Store, canonicalise
from incstore.storepath import nix32_encode

_PROSE = (
    "define module lambda export import package build phase configure install check output "
    "input native propagated license synopsis description home-page source origin method "
    "uri sha256 base32 arguments inputs gnu guix store profile manifest derivation"
)
_WORDS = _PROSE.split()


@dataclass(frozen=True)
class SampleSpec:
    """How big a sample store is: item count and the size of the largest blobs in bytes."""

    items: int = 12
    blob_bytes: int = 64 << 10
    modules: int = 20
    seed: int = 1


def _text(rng: random.Random, nbytes: int, refs: list[str]) -> bytes:
    words: list[str] = []
    size = 0
    while size < nbytes:
        word = rng.choice(_WORDS) if rng.random() > 0.02 or not refs else rng.choice(refs)
        words.append(word)
        size += len(word) + 1
    return (" ".join(words) + "\n").encode()


def _blob(rng: random.Random, nbytes: int) -> bytes:
    # half incompressible, half repetitive: roughly what compiled code compresses like
    random_part = rng.randbytes(nbytes // 2)
    pattern = rng.randbytes(64)
    return random_part + (pattern * (nbytes // 128 + 1))[: nbytes - nbytes // 2]


# the same licence text in every package, as in real stores (what deduplication links)
LICENSE_TEXT = b"".join(
    f"{n:4d} This program is free software: you can redistribute it and/or modify it.\n".encode()
    for n in range(160))


def _write(path: Path, data: bytes, executable: bool = False) -> None:
    path.write_bytes(data)
    path.chmod(0o555 if executable else 0o444)


def new_store_path(rng: random.Random, flavour: Flavour, name: str) -> str:
    return f"{flavour.store_dir}/{nix32_encode(rng.randbytes(20))}-{name}"


def _build_item(rng: random.Random, root: Path, path: str, refs: list[str], spec: SampleSpec,
                index: int) -> None:
    kind = index % 4
    if kind == 3 and index % 8 == 3:
        # a single-file item, like a builder script or a patch
        _write(root, b"#!/bin/sh\n" + _text(rng, 400, refs), executable=True)
        canonicalise(root)
        return
    root.mkdir()
    (root / "bin").mkdir()
    _write(root / "bin" / f"prog{index}", _blob(rng, rng.randint(spec.blob_bytes // 4,
                                                                  spec.blob_bytes)), True)
    (root / "lib").mkdir()
    _write(root / "lib" / f"lib{index}.so.1.0", _blob(rng, spec.blob_bytes // 2))
    os.symlink(f"lib{index}.so.1.0", root / "lib" / f"lib{index}.so.1")
    if refs:
        target = f"{refs[0]}/share"
        os.symlink(target, root / "lib" / "dep-share")  # an absolute link into another item
    share = root / "share" / "doc"
    share.mkdir(parents=True)
    _write(share / "README", _text(rng, 2000, refs))
    _write(share / "EMPTY", b"")
    _write(share / "COPYING", LICENSE_TEXT)
    (root / "share" / "empty-dir").mkdir()
    if kind == 1:
        mods = root / "share" / "guile" / "site" / "3.0" / f"pkg{index}"
        mods.mkdir(parents=True)
        for m in range(spec.modules):
            _write(mods / f"module-{m:03d}.scm", _text(rng, rng.randint(200, 3000), refs))
            _write(mods / f"module-{m:03d}.go", _blob(rng, rng.randint(500, 4000)))
    _write(root / "share" / "refs", "\n".join([*refs, path]).encode())
    canonicalise(root)


def _derivation(path: str, outputs: list[tuple[str, str]], refs: list[str]) -> bytes:
    outs = ",".join(f'("{oid}","{opath}","","")' for oid, opath in outputs)
    ins = ",".join(f'"{r}"' for r in refs)
    return f'Derive([{outs}],[],[{ins}],"x86_64-linux","/bin/sh",[],[])'.encode()


def add_items(prefix: Path, flavour: Flavour, count: int, *, seed: int, spec: SampleSpec,
              db_path: Path | None = None, start: int = 0) -> list[PathInfo]:
    """Create `count` new items under `prefix` that reference existing ones; register them."""
    store = Store(prefix, flavour)
    target = db_path or store.default_db
    existing = sorted(db.valid_paths(target, flavour)) if target.exists() else []
    infos = _generate(store, count, existing, random.Random(seed), spec, start)
    if target.exists():
        db.register_in_place(target, flavour, infos)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        db.create(target, flavour, infos)
    return infos


def _generate(store: Store, count: int, existing: list[str], rng: random.Random,
              spec: SampleSpec, start: int) -> list[PathInfo]:
    store.store_root.mkdir(parents=True, exist_ok=True)
    made: list[PathInfo] = []
    pool = list(existing)
    for n in range(count):
        index = start + n
        name = f"pkg{index}-{rng.randint(1, 9)}.{rng.randint(0, 20)}"
        path = new_store_path(rng, store.flavour, name)
        refs = sorted(rng.sample(pool, min(len(pool), rng.randint(0, 4))))
        _build_item(rng, store.physical(path), path, refs, spec, index)
        references = [*refs, path] if index % 2 else refs
        made.append(_info(store, path, tuple(sorted(references)), None, (), index))
        pool.append(path)
        if index % 5 == 0:
            # the derivation that "built" it: a .drv text with its DerivationOutputs row
            drv = new_store_path(rng, store.flavour, f"{name}.drv")
            _write(store.physical(drv), _derivation(drv, [("out", path)], refs))
            canonicalise(store.physical(drv))
            made.append(_info(store, drv, tuple(refs), None, (("out", path),), index))
            made[-2] = _info(store, path, tuple(sorted(references)), drv, (), index)
    return made


def _info(store: Store, path: str, refs: tuple[str, ...], deriver: str | None,
          outputs: tuple[tuple[str, str], ...], index: int) -> PathInfo:
    digest = nar.dump_hashed(store.physical(path))
    ultimate = 1 if store.flavour.extra_columns else None
    return PathInfo(path, digest.db_hash, digest.size, 1_700_000_000 + index, deriver, refs,
                    outputs, ultimate=ultimate)


def build(prefix: Path, flavour: Flavour, spec: SampleSpec) -> list[PathInfo]:
    """A fresh sample store with `spec.items` items and its daemon DB under `prefix`."""
    return add_items(prefix, flavour, spec.items, seed=spec.seed, spec=spec)
