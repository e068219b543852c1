"""End to end through the real CLI: save, incremental save, restore, partial restore, --db-out."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from incstore import db, sample
from incstore.demo import rows
from incstore.store import Store
from incstore.verify import verify_store

from .conftest import SampleStore, make_sample, run, validate_manifest


def nar_files(cache: Path) -> set[str]:
    return {p.name for p in (cache / "nar").iterdir()}


def test_save_then_restore_into_empty_prefix_is_identical(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path]
) -> None:
    src, cache, manifest = saved
    doc = validate_manifest(manifest)
    assert len(doc["items"]) == len(src.infos)
    assert len(nar_files(cache)) == len(src.infos)
    dst = tmp_path / "dst"
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst, "--json")
    assert r.code == 0, r.err
    assert r.json()["extracted"] == len(src.infos)
    dst_store = Store(dst, db.GUIX)
    report = verify_store(dst_store, dst_store.default_db)
    assert report.ok, report.problems
    assert report.checked == len(src.infos)
    # ValidPaths (path, hash, narSize, deriver, registrationTime), Refs and DerivationOutputs
    assert rows(dst_store.default_db) == rows(src.db_path)
    assert (dst / "var/guix/db/schema").read_bytes() == b"7"
    assert not list((dst / "gnu/store").glob(".incstore-tmp-*"))
    assert any(i.derivation_outputs for i in rows(dst_store.default_db).values())
    assert any(i.path in i.references for i in rows(dst_store.default_db).values())


def test_second_save_after_three_new_items_writes_exactly_three_chunks(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path]
) -> None:
    src, cache, _ = saved
    before = nar_files(cache)
    spec = sample.SampleSpec(items=3, blob_bytes=16 << 10, modules=6)
    new = sample.add_items(src.prefix, db.GUIX, 3, seed=99, spec=spec, start=1001)
    assert len(new) == 3
    r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
            "--manifest", tmp_path / "m2.json", "--json")
    assert r.code == 0, r.err
    assert r.json()["written"] == 3
    after = nar_files(cache)
    assert len(after - before) == 3
    assert {n.split(".")[0] for n in after - before} == {
        i.path.split("/")[-1][:32] for i in new
    }
    doc = validate_manifest(tmp_path / "m2.json")
    assert len(doc["items"]) == len(src.infos) + 3


def test_restore_into_mostly_populated_prefix_extracts_only_the_missing(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path]
) -> None:
    src, cache, manifest = saved
    dst = tmp_path / "dst"
    assert run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst).code == 0
    # make about 10% of the items missing: leaves, so the rest stays a closed set
    snapshot = rows(Store(dst, db.GUIX).default_db)
    referenced = {r for i in snapshot.values() for r in i.references if r != i.path}
    leaves = sorted(p for p in snapshot if p not in referenced)[: max(1, len(snapshot) // 10)]
    conn = sqlite3.connect(Store(dst, db.GUIX).default_db)
    with conn:
        for path in leaves:
            conn.execute("delete from ValidPaths where path = ?", (path,))
    conn.close()
    from incstore.store import remove_tree
    for path in leaves:
        remove_tree(Store(dst, db.GUIX).physical(path))
    present = {p: os.lstat(Store(dst, db.GUIX).physical(p)) for p in snapshot if p not in leaves}
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst, "--json")
    assert r.code == 0, r.err
    assert r.json()["extracted"] == len(leaves)
    assert r.json()["present"] == len(snapshot) - len(leaves)
    for path, st in present.items():
        now = os.lstat(Store(dst, db.GUIX).physical(path))
        assert (now.st_ino, now.st_ctime_ns) == (st.st_ino, st.st_ctime_ns), path
    assert rows(Store(dst, db.GUIX).default_db) == rows(src.db_path)
    report = verify_store(Store(dst, db.GUIX), Store(dst, db.GUIX).default_db)
    assert report.ok, report.problems


def test_noop_restore_extracts_nothing_and_keeps_the_db(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path]
) -> None:
    _src, cache, manifest = saved
    dst = tmp_path / "dst"
    assert run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst).code == 0
    db_file = Store(dst, db.GUIX).default_db
    inode = db_file.stat().st_ino
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst, "--json")
    assert r.code == 0, r.err
    assert r.json()["extracted"] == 0
    assert db_file.stat().st_ino == inode  # nothing to register: the DB was not rewritten


def test_dry_run_prints_the_plan_and_changes_nothing(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path]
) -> None:
    src, cache, manifest = saved
    dst = tmp_path / "dst"
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst, "--dry-run",
            "--json")
    assert r.code == 0, r.err
    plan = r.json()
    assert sorted(plan["extract"]) == sorted(i.path for i in src.infos)
    assert plan["present"] == []
    assert not dst.exists()
    human = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst, "--dry-run")
    assert sum(ln.startswith("extract ") for ln in human.out.splitlines()) == len(src.infos)
    save_plan = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
                    "--manifest", tmp_path / "x.json", "--dry-run", "--json").json()
    assert save_plan["write"] == [] and len(save_plan["reuse"]) == len(src.infos)
    assert not (tmp_path / "x.json").exists()


def test_db_out_leaves_the_target_db_untouched(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path]
) -> None:
    src, cache, manifest = saved
    dst = tmp_path / "dst"
    base = make_sample(dst, items=3, seed=7)  # the target already has its own items
    before = base.db_path.read_bytes()
    out = tmp_path / "out.sqlite"
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst,
            "--db-out", out, "--json")
    assert r.code == 0, r.err
    assert base.db_path.read_bytes() == before
    merged = rows(out)
    assert set(merged) == {i.path for i in src.infos} | {i.path for i in base.infos}
    assert {p: merged[p] for p in rows(src.db_path)} == rows(src.db_path)


def test_closure_of_limits_the_save(tmp_path: Path, guix_store: SampleStore) -> None:
    snapshot = db.read_snapshot(guix_store.db_path)
    root = max(snapshot.infos, key=lambda p: len(snapshot.closure([p])))
    closure = snapshot.closure([root])
    assert len(closure) < len(snapshot.infos)
    r = run("save", "--db", guix_store.db_path, "--prefix", guix_store.prefix,
            "--cache", tmp_path / "c", "--manifest", tmp_path / "m.json", "--closure-of", root)
    assert r.code == 0, r.err
    doc = validate_manifest(tmp_path / "m.json")
    assert sorted(i["path"] for i in doc["items"]) == closure


def test_cache_defaults_to_env(tmp_path: Path, guix_store: SampleStore) -> None:
    env = {"INCSTORE_CACHE": str(tmp_path / "envcache")}
    r = run("save", "--db", guix_store.db_path, "--prefix", guix_store.prefix,
            "--manifest", tmp_path / "m.json", env=env)
    assert r.code == 0, r.err
    assert (tmp_path / "envcache" / "nix-cache-info").read_text().startswith("StoreDir: /gnu/store")


def test_two_workflows_share_their_common_chunks(tmp_path: Path) -> None:
    a = make_sample(tmp_path / "a", items=10, seed=3)
    cache = tmp_path / "cache"
    assert run("save", "--db", a.db_path, "--prefix", a.prefix, "--cache", cache,
               "--manifest", tmp_path / "a.json").code == 0
    # workflow b: the same packages plus two of its own
    spec = sample.SampleSpec(items=2, blob_bytes=16 << 10, modules=6)
    new = sample.add_items(a.prefix, db.GUIX, 2, seed=5, spec=spec, start=500)
    r = run("save", "--db", a.db_path, "--prefix", a.prefix, "--cache", cache,
            "--manifest", tmp_path / "b.json", "--json")
    assert r.json()["reused"] == len(a.infos)
    assert r.json()["written"] == len(new)
    m = json.loads((tmp_path / "b.json").read_text())
    assert len(m["items"]) == len(a.infos) + len(new)


def test_a_save_reads_again_only_the_chunks_that_changed_since_it_checked_them(
        tmp_path: Path, guix_store: SampleStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reused chunks are checked by size and XXH3-128; this machine's record of that check
    (outside the chunk store) spares the read while the file's identity (device, inode, size,
    change time) is unchanged. A chunk rewritten in place, even with its size and mtime put
    back, has a new change time and is read, found wrong, and written again."""
    from incstore.chunkstore import ChunkStore
    from incstore.save import execute_save, plan_save

    cache = tmp_path / "cache"
    reads: list[str] = []
    real = ChunkStore.quick_digest

    def counting(self: ChunkStore, key: str, **kw: object) -> tuple[int, str]:
        reads.append(key)
        return real(self, key, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ChunkStore, "quick_digest", counting)

    def save() -> int:
        plan = plan_save(guix_store.db_path, guix_store.prefix, cache)
        return len(execute_save(plan, tmp_path / "m.json").written)

    assert save() == len(guix_store.infos)
    assert save() == 0 and reads == []  # written by this machine: nothing to read again
    reads.clear()
    victim = sorted((cache / "nar").iterdir())[0]
    before = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))  # in place: same inode and size
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert save() == 1
    assert reads == [victim.name.removesuffix(".nar.zst")]
    r = run("check", "--cache", cache)
    assert r.code == 0, r.err


@pytest.mark.parametrize("keep_days,rewritten", [(1, True), (30, False)])
def test_an_unchanged_manifest_is_refreshed_well_within_keep_days(
        tmp_path: Path, keep_days: float, rewritten: bool) -> None:
    """Once a day whatever keep-days was let a manifest in daily use, unchanged, outlive a
    1-day keep-days only by luck; now it is rewritten at least four times within it."""
    import time

    from incstore.chunkstore import ChunkStore
    from incstore.manifest import from_bytes
    from incstore.save import execute_save, plan_save, previous_manifest

    from . import manifests

    src = make_sample(tmp_path / "src", items=4, seed=61)
    cache = tmp_path / "cache"

    def save() -> None:
        plan = plan_save(src.db_path, src.prefix, cache, previous=previous_manifest(cache, "w"),
                         keep_days=keep_days)
        assert not execute_save(plan, None, name="w").failed

    save()
    path = cache / "manifests" / "w.json"
    doc = manifests.load(path)
    seven_hours_ago = time.time() - 7 * 3600
    doc["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seven_hours_ago))
    for item in doc["items"]:
        item["seen"] = int(seven_hours_ago)
    manifests.dump(path, doc)
    before = path.read_bytes()
    save()
    after = from_bytes(ChunkStore(cache).read_manifest("w"), "w")
    assert (path.read_bytes() != before) == rewritten
    assert (after.seen(0) > seven_hours_ago + 3600) == rewritten


@pytest.mark.parametrize("fsync", [False, True], ids=["default", "fsync"])
def test_durability_is_the_daemons_unless_asked_for_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool) -> None:
    """By default only the DB and the manifest are synced (a handful of fsyncs whatever the
    item count, no syncfs, which would also wait for everything else the job wrote to the
    disk); with --fsync, the store trees and the chunks are made durable before their names."""
    from incstore import atomicfile
    from incstore import manifest as manifest_mod
    from incstore.restore import execute_restore, plan_restore
    from incstore.save import execute_save, plan_save

    calls = {"fsync": 0, "syncfs": 0}
    real_fsync, real_syncfs = os.fsync, atomicfile.syncfs

    def counting_fsync(fd: int) -> None:
        calls["fsync"] += 1
        real_fsync(fd)

    def counting_syncfs(fd: int) -> None:
        calls["syncfs"] += 1
        real_syncfs(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    monkeypatch.setattr(atomicfile, "syncfs", counting_syncfs)
    src = make_sample(tmp_path / "src", items=40, seed=62)
    cache, out = tmp_path / "cache", tmp_path / "m.json"
    result = execute_save(plan_save(src.db_path, src.prefix, cache), out, name="w", fsync=fsync)
    assert len(result.written) == len(src.infos) >= 40
    saved = dict(calls)
    calls.update(fsync=0, syncfs=0)
    plan = plan_restore(manifest_mod.load(out), tmp_path / "dst", cache)
    restored = execute_restore(plan, fsync=fsync)
    assert len(restored.registered) == len(src.infos)
    if fsync:
        assert saved["syncfs"] >= 1 and calls["syncfs"] >= 1
    else:
        # a constant handful, not one per item: manifests, records and the DB, with their dirs
        assert saved["syncfs"] == 0 and saved["fsync"] <= 12, saved
        assert calls["syncfs"] == 0 and calls["fsync"] <= 12, calls


def test_a_save_after_a_restore_does_not_read_the_chunks_the_restore_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CI runner the chunk store arrives from the cache: the restore reads and checks
    every chunk it extracts, so the save that follows need not read them again to reuse
    them (it used to read the whole chunk store to learn that nothing changed)."""
    import shutil

    from incstore import manifest as manifest_mod
    from incstore.chunkstore import ChunkStore
    from incstore.restore import execute_restore, plan_restore
    from incstore.save import execute_save, plan_save

    src = make_sample(tmp_path / "src", items=12, seed=63)
    execute_save(plan_save(src.db_path, src.prefix, tmp_path / "first"), tmp_path / "m.json")
    reads: list[str] = []
    real = ChunkStore.quick_digest

    def counting(self: ChunkStore, key: str, **kw: object) -> object:
        reads.append(key)
        return real(self, key, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ChunkStore, "quick_digest", counting)
    for restored in (False, True):
        cache = tmp_path / f"arrived-{restored}"  # as if extracted from a cache entry
        shutil.copytree(tmp_path / "first", cache)
        if restored:
            dst = tmp_path / "dst"
            plan = plan_restore(manifest_mod.load(tmp_path / "m.json"), dst, cache)
            assert len(execute_restore(plan).registered) == len(src.infos)
        reads.clear()
        result = execute_save(plan_save(src.db_path, src.prefix, cache), tmp_path / "m2.json")
        assert not result.written and len(result.reused) == len(src.infos)
        assert len(reads) == (0 if restored else len(src.infos)), reads
