"""Concurrent saves into one chunk store, save and restore on one store at once, debris."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from incstore import db, sample
from incstore.chunkstore import ChunkStore
from incstore.demo import rows
from incstore.store import Store, remove_tree
from incstore.verify import verify_store

from .conftest import SampleStore, make_sample, run, validate_manifest


def popen(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "incstore", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_saves_of_overlapping_items(tmp_path: Path) -> None:
    base = make_sample(tmp_path / "a", items=14, seed=21)
    # a second store that shares most of its items with the first (same paths, same files)
    b_prefix = tmp_path / "b"
    subprocess.run(["cp", "-a", str(tmp_path / "a"), str(b_prefix)], check=True)
    spec = sample.SampleSpec(items=4, blob_bytes=16 << 10, modules=6)
    extra = sample.add_items(b_prefix, db.GUIX, 4, seed=22, spec=spec, start=300)
    cache = tmp_path / "cache"
    for _round in range(3):
        procs = [
            popen("save", "--db", Store(p, db.GUIX).default_db, "--prefix", p, "--cache", cache,
                  "--manifest", tmp_path / f"{p.name}.json", "--level", level)
            for p, level in ((base.prefix, "3"), (b_prefix, "9"))
        ]
        for proc in procs:
            _out, err = proc.communicate()
            assert proc.returncode == 0, err
    chunks = ChunkStore(cache)
    for name in ("a", "b"):
        doc = validate_manifest(tmp_path / f"{name}.json")
        for item in doc["items"]:
            found = chunks.inspect(item["chunk"]["key"])
            assert found.xxh3_128 == item["chunk"]["xxh3_128"], item["path"]
            assert "sha256:" + found.nar_sha256 == item["nar_hash"]
    assert len(validate_manifest(tmp_path / "b.json")["items"]) == len(base.infos) + len(extra)
    names = os.listdir(cache / "nar")
    assert not [n for n in names if n.startswith(".tmp")]
    assert len(names) == len(base.infos) + len(extra)


def test_save_and_restore_on_one_store_at_once(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=12, seed=31)
    cache = tmp_path / "cache"
    assert run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
               "--manifest", tmp_path / "m.json").code == 0
    # the target store has its own items and is saved while the restore adds others to it
    target = make_sample(tmp_path / "dst", items=10, seed=32)
    saving = popen("save", "--db", target.db_path, "--prefix", target.prefix,
                   "--cache", tmp_path / "cache2", "--manifest", tmp_path / "t.json")
    restoring = popen("restore", "--manifest", tmp_path / "m.json", "--cache", cache,
                      "--prefix", target.prefix)
    for proc in (saving, restoring):
        _, err = proc.communicate()
        assert proc.returncode == 0, err
    doc = validate_manifest(tmp_path / "t.json")
    assert {i.path for i in target.infos} <= {i["path"] for i in doc["items"]}
    report = verify_store(target.store, target.db_path)
    assert report.ok, report.problems
    assert set(rows(target.db_path)) == {i.path for i in target.infos} | set(rows(src.db_path))


def test_unregistered_debris_at_a_target_path_is_replaced(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path]
) -> None:
    src, cache, manifest = saved
    dst = tmp_path / "dst"
    victim = next(i.path for i in src.infos if src.store.physical(i.path).is_dir())
    debris = Store(dst, db.GUIX).physical(victim)
    (debris / "half-built").mkdir(parents=True)
    (debris / "half-built" / "junk").write_text("interrupted build")
    (debris / "half-built").chmod(0o555)
    debris.chmod(0o555)
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst, "--json")
    assert r.code == 0, r.err
    assert not (debris / "half-built").exists()
    report = verify_store(Store(dst, db.GUIX), Store(dst, db.GUIX).default_db)
    assert report.ok, report.problems


def test_valid_item_missing_on_disk_is_restored_and_its_row_kept(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path]
) -> None:
    src, cache, manifest = saved
    dst = tmp_path / "dst"
    assert run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst).code == 0
    victim = src.infos[0].path
    remove_tree(Store(dst, db.GUIX).physical(victim))
    before = rows(Store(dst, db.GUIX).default_db)
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst, "--json")
    assert r.code == 0, r.err
    assert r.json()["extracted"] == 1
    assert rows(Store(dst, db.GUIX).default_db) == before
    assert verify_store(Store(dst, db.GUIX), Store(dst, db.GUIX).default_db).ok
