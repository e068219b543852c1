"""Workflows sharing one chunk store: named manifests, --exclude-db, gc, check, stats, diff."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from incstore import db
from incstore.chunkstore import ChunkStore
from incstore.demo import rows
from incstore.errors import ChunkCorruptError, ChunkMissingError, PartialFailureError, StoreError
from incstore.store import Store
from incstore.verify import verify_store

from .conftest import SampleStore, make_sample, run, validate_manifest


def workflow_dbs(tmp_path: Path, src: SampleStore, groups: list[list[int]]) -> list[Path]:
    """One daemon DB per workflow over the same physical store: each registers a closed subset."""
    infos = sorted(src.infos, key=lambda i: -i.nar_size)
    closed = [i for i in infos if not set(i.references) - {i.path}]
    # seven groups balanced by size (round robin over the items sorted by size)
    parts = [closed[g::7] for g in range(7)]
    paths = []
    for n, members in enumerate(groups):
        chosen = [i for g in members for i in parts[g]]
        path = tmp_path / f"w{n}" / "db.sqlite"
        path.parent.mkdir()
        db.create(path, db.GUIX, chosen)
        paths.append(path)
    return paths


def save_named(db_path: Path, src: SampleStore, cache: Path, name: str) -> None:
    r = run("save", "--db", db_path, "--prefix", src.prefix, "--cache", cache, "--name", name)
    assert r.code == 0, r.err


def chunk_bytes(cache: Path) -> int:
    return sum(e.size for e in ChunkStore(cache).chunk_files().values())


def three_workflows(tmp_path: Path, extra: list[list[int]] | None = None
                    ) -> tuple[SampleStore, Path, list[Path]]:
    src = make_sample(tmp_path / "src", items=56, seed=41)
    # every pair of workflows shares 4 of their 5 groups: 80% of each closure
    dbs = workflow_dbs(tmp_path, src, [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [0, 1, 2, 3, 5],
                                       *(extra or [])])
    cache = tmp_path / "shared"
    for n, path in enumerate(dbs):
        save_named(path, src, cache, f"w{n}")
    return src, cache, dbs


def test_three_overlapping_workflows_share_one_chunk_store(tmp_path: Path) -> None:
    src, cache, dbs = three_workflows(tmp_path)
    alone = []
    for n, path in enumerate(dbs):
        single = tmp_path / f"alone{n}"
        save_named(path, src, single, "x")
        alone.append(chunk_bytes(single))
    assert chunk_bytes(cache) <= 1.25 * max(alone)
    r = run("stats", "--cache", cache, "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert sorted(doc["manifests"]) == ["w0", "w1", "w2"]
    for a in ("w0", "w1", "w2"):
        m = doc["manifests"][a]
        assert m["unique_bytes"] + m["shared_bytes"] == m["chunk_bytes"]
        for b in ("w0", "w1", "w2"):
            if a != b:
                assert doc["overlap"][a][b] >= 0.6 * m["chunk_bytes"]
    assert doc["store_bytes"] == chunk_bytes(cache)
    human = run("stats", "--cache", cache)
    assert "overlap" in human.out and "w2" in human.out
    d = run("diff", "--cache", cache, "w0", "w1", "--json").json()
    assert len(d["common"]) > 3 * len(d["only_a"])


def test_restore_by_name(tmp_path: Path) -> None:
    _src, cache, _ = three_workflows(tmp_path)
    dst = tmp_path / "dst"
    r = run("restore", "--name", "w1", "--cache", cache, "--prefix", dst, "--json")
    assert r.code == 0, r.err
    assert verify_store(Store(dst, db.GUIX), Store(dst, db.GUIX).default_db).ok
    r = run("restore", "--name", "nope", "--cache", cache, "--prefix", dst)
    assert r.code == 3 and "nope" in r.err
    r = run("restore", "--name", "../../etc/passwd", "--cache", cache, "--prefix", dst)
    assert r.code == 3 and "invalid manifest name" in r.err


def test_gc_after_dropping_one_manifest_removes_exactly_its_own_chunks(tmp_path: Path) -> None:
    _, cache, _ = three_workflows(tmp_path, extra=[[0, 6]])  # w3: one group of its own
    chunks = ChunkStore(cache)
    names = ("w0", "w1", "w2", "w3")
    keys = {name: {i["chunk"]["key"] for i in validate_manifest(chunks.manifest_path(name))
                   ["items"]} for name in names}
    only_w3 = keys["w3"] - keys["w0"] - keys["w1"] - keys["w2"]
    assert only_w3 and keys["w3"] - only_w3
    old = time.time() - 10 * 86400
    os.utime(chunks.manifest_path("w3"), (old, old))
    dry = run("gc", "--cache", cache, "--keep-days", "7", "--grace-minutes", "0", "--dry-run",
              "--json").json()
    assert dry["drop_manifests"] == ["w3"] and set(dry["sweep_chunks"]) == only_w3
    assert set(chunks.chunk_files()) == set().union(*keys.values())  # dry: untouched
    r = run("gc", "--cache", cache, "--keep-days", "7", "--grace-minutes", "0", "--json")
    assert r.code == 0, r.err
    assert set(chunks.chunk_files()) == keys["w0"] | keys["w1"] | keys["w2"]
    assert not [k for k in only_w3 if chunks.narinfo_path(k).exists()]
    assert chunks.manifest_names() == ["w0", "w1", "w2"]
    assert run("check", "--cache", cache, "--full").code == 0


def test_gc_grace_period_and_max_bytes(tmp_path: Path) -> None:
    _, cache, _ = three_workflows(tmp_path)
    chunks = ChunkStore(cache)
    old = time.time() - 10 * 86400
    for name, age in (("w0", 3), ("w1", 2), ("w2", 1)):
        os.utime(chunks.manifest_path(name), (old + age, old + age))
    # expired, but its chunks are young: the grace period keeps them this time
    r = run("gc", "--cache", cache, "--keep-days", "7", "--json").json()
    assert r["dropped"] == ["w0", "w1", "w2"] and r["swept"] == 0 and r["kept_in_grace"]
    _, cache, _ = three_workflows(tmp_path / "again")
    chunks = ChunkStore(cache)
    for name, age in (("w0", 1), ("w1", 2), ("w2", 3)):
        os.utime(chunks.manifest_path(name), (old + age, old + age))
    budget = chunk_bytes(cache) - 1
    r = run("gc", "--cache", cache, "--max-bytes", str(budget), "--grace-minutes", "0",
            "--json").json()
    # oldest first; dropping w0 alone frees nothing (w1 and w2 cover all its chunks)
    assert r["over_budget"] == ["w0", "w1"]
    assert chunk_bytes(cache) <= budget
    assert chunks.manifest_names() == ["w2"]
    assert run("check", "--cache", cache, "--full").code == 0


def test_gc_reports_whether_the_store_changed(tmp_path: Path) -> None:
    src, cache, dbs = three_workflows(tmp_path)
    first = run("gc", "--cache", cache, "--json").json()
    assert first["changed"] is True
    again = run("gc", "--cache", cache, "--json").json()
    assert again["changed"] is False and again["digest"] == first["digest"]
    save_named(dbs[0], src, cache, "w0")  # nothing new: the named manifest is only touched
    assert run("gc", "--cache", cache, "--json").json()["changed"] is False
    save_named(dbs[0], src, cache, "w9")
    assert run("gc", "--cache", cache, "--json").json()["changed"] is True


def test_save_running_with_gc_loses_nothing_a_kept_manifest_needs(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=20, seed=51)
    cache = tmp_path / "cache"
    save_named(src.db_path, src, cache, "old")
    chunks = ChunkStore(cache)
    ancient = time.time() - 30 * 86400
    for rounds in range(4):
        # the only manifest is expired and every chunk is old: all of it is sweepable...
        os.utime(chunks.manifest_path("old"), (ancient, ancient))
        for key in chunks.chunk_files():
            os.utime(chunks.chunk_path(key), (ancient, ancient))
        # ...while a save that needs the same chunks runs at the same time
        save = subprocess.Popen([sys.executable, "-m", "incstore", "save", "--db", src.db_path,
                                 "--prefix", src.prefix, "--cache", cache, "--name",
                                 f"new{rounds}"], stderr=subprocess.PIPE, text=True)
        gc = subprocess.Popen([sys.executable, "-m", "incstore", "gc", "--cache", cache,
                               "--keep-days", "1", "--grace-minutes", "1"],
                              stderr=subprocess.PIPE, text=True)
        for proc in (save, gc):
            _, err = proc.communicate()
            assert proc.returncode == 0, err
        r = run("check", "--cache", cache, "--full", "--json")
        assert r.code == 0, r.out
        assert r.json()["ok"]
        # keep the next round's race meaningful: the new manifest becomes the old one
        chunks.manifest_path(f"new{rounds}").rename(chunks.manifest_path("old"))


def test_check_full_names_a_flipped_byte_a_missing_chunk_and_an_orphan(tmp_path: Path) -> None:
    _src, cache, _ = three_workflows(tmp_path)
    chunks = ChunkStore(cache)
    doc = validate_manifest(chunks.manifest_path("w0"))
    flipped, gone = doc["items"][0], doc["items"][1]
    f = chunks.chunk_path(flipped["chunk"]["key"])
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    chunks.chunk_path(gone["chunk"]["key"]).unlink()
    orphan = ChunkStore(tmp_path / "other")
    save_named(make_sample(tmp_path / "o", items=1, seed=99).db_path,
               SampleStore(tmp_path / "o", db.GUIX, []), tmp_path / "other", "o")
    key = next(iter(orphan.chunk_files()))
    (cache / "nar" / f"{key}.nar.zst").write_bytes(orphan.chunk_path(key).read_bytes())
    r = run("check", "--cache", cache, "--full", "--json")
    assert r.code == PartialFailureError.exit_code
    out = r.json()
    assert any(flipped["path"] in e for e in out["corrupt"])
    assert any(gone["path"] in e for e in out["missing"])
    assert key in out["orphans"]
    human = run("check", "--cache", cache, "--full")
    assert f"orphan:  {key}" in human.out and "DAMAGED" in human.out
    # one kind of damage alone gives that kind's own exit code
    chunks.chunk_path(flipped["chunk"]["key"]).unlink()
    assert run("check", "--cache", cache).code == ChunkMissingError.exit_code
    assert ChunkCorruptError.exit_code != ChunkMissingError.exit_code


def test_exclude_db_records_what_the_installer_provides(tmp_path: Path) -> None:
    # the "binary tarball" store: its DB ships with it; the workflow adds items on top
    base = make_sample(tmp_path / "src", items=8, seed=61)
    installer_db = tmp_path / "installer" / "db.sqlite"
    installer_db.parent.mkdir()
    db.create(installer_db, db.GUIX, base.infos)
    from incstore import sample

    spec = sample.SampleSpec(items=5, blob_bytes=16 << 10, modules=6)
    added = sample.add_items(base.prefix, db.GUIX, 5, seed=62, spec=spec, start=700)
    r = run("save", "--db", base.db_path, "--prefix", base.prefix, "--cache", tmp_path / "c",
            "--manifest", tmp_path / "m.json", "--exclude-db", installer_db)
    assert r.code == 0, r.err
    doc = validate_manifest(tmp_path / "m.json")
    assert sorted(i["path"] for i in doc["items"]) == sorted(i.path for i in added)
    assert set(doc["external"]) <= {i.path for i in base.infos}
    assert doc["external"]
    # a target that has the installer's items: the restore merges the workflow's on top
    target = tmp_path / "target"
    subprocess.run(["cp", "-a", str(base.prefix), str(target)], check=True)
    for info in added:
        from incstore.store import remove_tree

        remove_tree(Store(target, db.GUIX).physical(info.path))
    db.create(Store(target, db.GUIX).default_db.with_name("fresh.sqlite"), db.GUIX, base.infos)
    Store(target, db.GUIX).default_db.with_name("fresh.sqlite").replace(
        Store(target, db.GUIX).default_db)
    r = run("restore", "--manifest", tmp_path / "m.json", "--cache", tmp_path / "c",
            "--prefix", target, "--json")
    assert r.code == 0, r.err
    assert rows(Store(target, db.GUIX).default_db) == rows(base.db_path)
    # an empty target lacks what the manifest leaves to it: refused by name, nothing registered
    r = run("restore", "--manifest", tmp_path / "m.json", "--cache", tmp_path / "c",
            "--prefix", tmp_path / "empty")
    assert r.code == StoreError.exit_code
    assert doc["external"][0] in r.err or any(e in r.err for e in doc["external"])
    assert not set(rows(Store(tmp_path / "empty", db.GUIX).default_db)) & set(doc["external"])
