"""Shared fixtures: generated sample stores with real daemon DBs, and a runner for the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

from incstore import db, sample
from incstore.store import Store

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "schema" / "manifest.schema.json").read_text())

needs_nix = pytest.mark.skipif(shutil.which("nix-store") is None, reason="nix-bin not installed")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.out)


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """Run the real CLI as a separate process, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "incstore", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def validate_manifest(path: Path) -> dict:  # type: ignore[type-arg]
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, SCHEMA)
    return doc


@dataclass
class SampleStore:
    prefix: Path
    flavour: db.Flavour
    infos: list[db.PathInfo]

    @property
    def store(self) -> Store:
        return Store(self.prefix, self.flavour)

    @property
    def db_path(self) -> Path:
        return self.store.default_db


def make_sample(prefix: Path, flavour: db.Flavour = db.GUIX, items: int = 16,
                seed: int = 1) -> SampleStore:
    spec = sample.SampleSpec(items=items, blob_bytes=16 << 10, modules=6, seed=seed)
    return SampleStore(prefix, flavour, sample.build(prefix, flavour, spec))


@pytest.fixture
def guix_store(tmp_path: Path) -> SampleStore:
    return make_sample(tmp_path / "src")


@pytest.fixture
def saved(tmp_path: Path, guix_store: SampleStore) -> tuple[SampleStore, Path, Path]:
    """A sample store already saved: (store, cache dir, manifest path)."""
    cache, manifest = tmp_path / "cache", tmp_path / "m.json"
    r = run("save", "--db", guix_store.db_path, "--prefix", guix_store.prefix,
            "--cache", cache, "--manifest", manifest)
    assert r.code == 0, r.err
    return guix_store, cache, manifest
