"""The real Nix (Debian's nix-bin 2.8) as an independent check of what incstore writes: Nix
stores saved and restored, the chunk store read as a binary cache, chunks equal to
`nix-store --dump`. Nix is only ever pointed at Nix stores it made or we restored."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import zstandard

from incstore import db
from incstore.demo import rows
from incstore.errors import ChunkStoreError, DatabaseError
from incstore.store import Store

from .conftest import make_sample, needs_nix, run, validate_manifest

pytestmark = needs_nix
NIX_CMD = ["--extra-experimental-features", "nix-command"]


def nix(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


def populate_with_nix(root: Path, tmp: Path) -> list[str]:
    """A chroot Nix store filled by Nix itself: added files and trees, and toFile texts that
    reference other store paths."""
    (tmp / "tree" / "sub").mkdir(parents=True)
    (tmp / "tree" / "sub" / "f").write_text("file in a tree\n")
    (tmp / "tree" / "exe").write_text("#!/bin/sh\n")
    (tmp / "tree" / "exe").chmod(0o755)
    (tmp / "tree" / "link").symlink_to("sub/f")
    (tmp / "single.txt").write_text("hello\n")
    paths = []
    for item in (tmp / "tree", tmp / "single.txt"):
        p = nix("nix-store", "--store", root, "--add", item)
        assert p.returncode == 0, p.stderr
        paths.append(p.stdout.strip())
    expr = (
        'let a = builtins.toFile "a" "hello"; b = builtins.toFile "b" "refers to ${a}"; '
        f'c = builtins.toFile "c" "refers to ${{b}}, ${{a}} and {paths[0]}"; in c'
    )
    p = nix("nix-instantiate", "--store", root, "--eval", "--read-write-mode", "-E", expr)
    assert p.returncode == 0, p.stderr
    paths.append(json.loads(p.stdout))
    return paths


def all_paths(root: Path) -> list[str]:
    return sorted(rows(root / "nix/var/nix/db/db.sqlite"))


def references(root: Path, path: str) -> list[str]:
    p = nix("nix-store", "--store", root, "-q", "--references", path)
    assert p.returncode == 0, p.stderr
    return sorted(p.stdout.split())


def check_contents(root: Path) -> None:
    p = nix("nix-store", "--store", root, "--verify", "--check-contents")
    assert p.returncode == 0, p.stderr
    noise = {"reading the Nix store...", "checking path existence...", "checking link hashes...",
             "checking store hashes..."}
    assert [ln for ln in p.stderr.splitlines() if ln not in noise] == []


@pytest.fixture
def nix_saved(tmp_path: Path) -> tuple[Path, Path, Path, list[str]]:
    src = tmp_path / "src"
    populate_with_nix(src, tmp_path)
    cache, manifest = tmp_path / "cache", tmp_path / "m.json"
    r = run("save", "--db", src / "nix/var/nix/db/db.sqlite", "--prefix", src, "--cache", cache,
            "--manifest", manifest)
    assert r.code == 0, r.err
    return src, cache, manifest, all_paths(src)


def test_nix_store_saved_and_restored_verifies_with_nix(
    tmp_path: Path, nix_saved: tuple[Path, Path, Path, list[str]]
) -> None:
    src, cache, manifest, paths = nix_saved
    doc = validate_manifest(manifest)
    assert doc["flavour"] == "nix" and len(doc["items"]) == len(paths) >= 5
    assert any((i["extra"] or {}).get("ca") for i in doc["items"])
    dst = tmp_path / "dst"
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst)
    assert r.code == 0, r.err
    assert (dst / "nix/var/nix/db/schema").read_bytes() == b"10"
    check_contents(dst)
    for path in paths:
        assert references(dst, path) == references(src, path)
    assert rows(dst / "nix/var/nix/db/db.sqlite") == rows(src / "nix/var/nix/db/db.sqlite")


def test_nix_copy_reads_the_chunk_store_as_a_binary_cache(
    tmp_path: Path, nix_saved: tuple[Path, Path, Path, list[str]]
) -> None:
    src, cache, _, paths = nix_saved
    info = nix("nix", *NIX_CMD, "path-info", "--json", "--store", f"file://{cache}", *paths)
    assert info.returncode == 0, info.stderr
    by_path = {i["path"]: i for i in json.loads(info.stdout)}
    assert sorted(by_path) == paths
    for path in paths:
        assert sorted(by_path[path]["references"]) == references(src, path)
    dst = tmp_path / "copied"
    p = nix("nix", *NIX_CMD, "copy", "--no-check-sigs", "--from", f"file://{cache}",
            "--to", dst, *paths)
    assert p.returncode == 0, p.stderr
    check_contents(dst)
    for path in paths:
        assert references(dst, path) == references(src, path)


def test_every_chunk_is_exactly_what_nix_store_dump_writes(
    nix_saved: tuple[Path, Path, Path, list[str]]
) -> None:
    src, cache, manifest, _ = nix_saved
    for item in validate_manifest(manifest)["items"]:
        chunk = (cache / "nar" / f"{item['chunk']['key']}.nar.zst").read_bytes()
        ours = zstandard.ZstdDecompressor().decompressobj().decompress(chunk)
        physical = src / item["path"].lstrip("/")
        dumped = subprocess.run(["nix-store", "--dump", str(physical)], capture_output=True,
                                check=True).stdout
        assert ours == dumped, item["path"]


def test_generated_nix_sample_store_restores_and_verifies(tmp_path: Path) -> None:
    sample_store = make_sample(tmp_path / "src", db.NIX, items=10)
    cache, manifest = tmp_path / "cache", tmp_path / "m.json"
    assert run("save", "--db", sample_store.db_path, "--prefix", sample_store.prefix,
               "--cache", cache, "--manifest", manifest).code == 0
    dst = tmp_path / "dst"
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst)
    assert r.code == 0, r.err
    check_contents(dst)


def test_guix_restore_leaves_a_db_nix_never_opened(tmp_path: Path) -> None:
    guix = make_sample(tmp_path / "src", items=6)
    cache, manifest = tmp_path / "cache", tmp_path / "m.json"
    assert run("save", "--db", guix.db_path, "--prefix", guix.prefix, "--cache", cache,
               "--manifest", manifest).code == 0
    dst = tmp_path / "dst"
    assert run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst).code == 0
    target = Store(dst, db.GUIX).default_db
    assert (target.parent / "schema").read_bytes() == b"7"
    import sqlite3

    conn = sqlite3.connect(target)
    columns = {r[1] for r in conn.execute("pragma table_info(ValidPaths)")}
    tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
    conn.close()
    assert "ultimate" not in columns and "FailedPaths" in tables  # not migrated by Nix


def test_flavours_never_cross(tmp_path: Path,
                              nix_saved: tuple[Path, Path, Path, list[str]]) -> None:
    _, cache, manifest, _ = nix_saved
    guix = make_sample(tmp_path / "guix", items=3)
    # a Nix manifest is not registered into a Guix DB...
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", tmp_path / "x",
            "--db", guix.db_path)
    assert r.code == DatabaseError.exit_code, r.err
    assert "is a guix DB" in r.err
    # ...and a Guix store is not saved into a chunk store of Nix items
    r = run("save", "--db", guix.db_path, "--prefix", guix.prefix, "--cache", cache,
            "--manifest", tmp_path / "g.json")
    assert r.code == ChunkStoreError.exit_code, r.err
    assert "/nix/store" in r.err
