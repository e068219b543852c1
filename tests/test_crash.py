"""Kill-anywhere harness: SIGKILL the real CLI at many points of save and restore, check that the
store, the DB and the chunk store are consistent right after the kill, run the same command
again, and check that it completes and leaves nothing behind. Every case runs twice: in the
default durability (the daemons': nothing synced but the DB and manifests) and with
`--fsync`; a kill must be safe in both."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from incstore import db, nar
from incstore.chunkstore import ChunkStore, NarInfo
from incstore.demo import rows
from incstore.store import Store

from .conftest import SampleStore, make_sample, run, validate_manifest

SAVE_POINTS = [("atomicfile.before-rename", n) for n in (1, 2, 4, 7, 11, 16, 22, 29, 35)] + [
    ("atomicfile.after-rename", n) for n in (1, 3, 6, 10, 15, 21, 28, 34)
]
RESTORE_POINTS = (
    [("restore.extracted", n) for n in (1, 2, 4, 7, 11, 15)]
    + [("restore.renamed", n) for n in (1, 3, 6, 10, 14, 17)]
    + [("db.copy-written", 1), ("db.swapped", 1), ("atomicfile.before-rename", 1),
       ("atomicfile.after-rename", 1)]
)
TIMED_KILLS = 10
MODES = pytest.mark.parametrize("mode", [[], ["--fsync"]], ids=["default", "fsync"])


def spawn(args: list[str | Path], kill_at: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("INCSTORE_KILL_AT", None)
    if kill_at:
        env["INCSTORE_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-m", "incstore", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_until_killed(args: list[str | Path], kill_at: str | None, delay: float | None) -> None:
    """Run the CLI until it kills itself at `kill_at`, or until we kill it after `delay`."""
    proc = spawn(args, kill_at)
    if delay is not None:
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    assert code in (-signal.SIGKILL, 0), proc.stderr.read() if proc.stderr else ""


def check_db(prefix: Path) -> None:
    """Every registered path exists and hashes to its DB hash; every reference is registered."""
    store = Store(prefix, db.GUIX)
    if not store.default_db.exists():
        return
    infos = rows(store.default_db)
    for path, info in infos.items():
        physical = store.physical(path)
        assert os.path.lexists(physical), f"{path} registered but missing"
        assert nar.dump_hashed(physical).db_hash == info.hash, f"{path} registered but wrong"
        for ref in info.references:
            assert ref in infos, f"{path} references unregistered {ref}"


def check_chunks(cache: Path) -> None:
    """No chunk under a final name is truncated; every narinfo's chunk is there and matches."""
    chunks = ChunkStore(cache)
    if not (cache / "nar").exists():
        return
    for f in (cache / "nar").iterdir():
        if f.name.endswith(".nar.zst") and not f.name.startswith(".tmp-incstore-"):
            chunks.inspect(f.name[: -len(".nar.zst")])  # raises on truncation or damage
    for f in cache.glob("*.narinfo"):
        if f.name.startswith(".tmp-incstore-"):
            continue
        key = f.name[: -len(".narinfo")]
        info = NarInfo.parse(f.read_text(), key)
        assert chunks.inspect(key).xxh3_128 == info.xxh3_128


def no_leftovers(*dirs: Path) -> None:
    for d in dirs:
        if d.exists():
            left = [p.name for p in d.rglob("*") if ".tmp-incstore-" in p.name
                    or p.name.startswith(".incstore-tmp-")
                    or (p.name.endswith(".lock") and p.parent.name == "store")]
            assert left == [], left


@pytest.fixture
def big_sample(tmp_path: Path) -> SampleStore:
    return make_sample(tmp_path / "src", items=16, seed=11)


def _kill_save(tmp_path: Path, src: SampleStore, kill_at: str | None, delay: float | None,
               mode: list[str]) -> None:
    cache, manifest = tmp_path / "cache", tmp_path / "m.json"
    args: list[str | Path] = ["save", "--db", src.db_path, "--prefix", src.prefix,
                              "--cache", cache, "--manifest", manifest, *mode]
    run_until_killed(args, kill_at, delay)
    check_chunks(cache)
    if manifest.exists():
        validate_manifest(manifest)
    r = run(*args)
    assert r.code == 0, r.err
    check_chunks(cache)
    no_leftovers(cache, tmp_path)
    doc = validate_manifest(manifest)
    assert len(doc["items"]) == len(src.infos)
    # the manifest's chunks are all there and match
    for item in doc["items"]:
        found = ChunkStore(cache).inspect(item["chunk"]["key"])
        assert found.xxh3_128 == item["chunk"]["xxh3_128"]
        assert "sha256:" + found.nar_sha256 == item["nar_hash"]


@MODES
@pytest.mark.parametrize(("point", "count"), SAVE_POINTS)
def test_kill_save_at_a_point(tmp_path: Path, big_sample: SampleStore, point: str,
                              count: int, mode: list[str]) -> None:
    _kill_save(tmp_path, big_sample, f"{point}:{count}", None, mode)


@MODES
@pytest.mark.parametrize("seed", range(TIMED_KILLS))
def test_kill_save_at_a_random_moment(tmp_path: Path, big_sample: SampleStore, seed: int,
                                      mode: list[str]) -> None:
    _kill_save(tmp_path, big_sample, None, random.Random(seed).uniform(0.15, 0.32), mode)


@pytest.fixture
def saved_big(tmp_path: Path, big_sample: SampleStore) -> tuple[SampleStore, Path, Path]:
    cache, manifest = tmp_path / "cache", tmp_path / "m.json"
    r = run("save", "--db", big_sample.db_path, "--prefix", big_sample.prefix, "--cache", cache,
            "--manifest", manifest)
    assert r.code == 0, r.err
    return big_sample, cache, manifest


def _kill_restore(tmp_path: Path, saved: tuple[SampleStore, Path, Path], kill_at: str | None,
                  delay: float | None, mode: list[str]) -> None:
    src, cache, manifest = saved
    dst = tmp_path / "dst"
    # the target already has part of the store, so registration merges into an existing DB
    first = make_sample(dst, items=2, seed=5)
    args: list[str | Path] = ["restore", "--manifest", manifest, "--cache", cache,
                              "--prefix", dst, "--jobs", "2", *mode]
    run_until_killed(args, kill_at, delay)
    check_db(dst)
    assert set(rows(first.db_path)) >= {i.path for i in first.infos}  # nothing lost
    r = run(*args)
    assert r.code == 0, r.err
    check_db(dst)
    no_leftovers(dst)
    merged = rows(Store(dst, db.GUIX).default_db)
    assert {p: merged[p] for p in rows(src.db_path)} == rows(src.db_path)
    assert set(merged) == set(rows(src.db_path)) | {i.path for i in first.infos}


@MODES
@pytest.mark.parametrize(("point", "count"), RESTORE_POINTS)
def test_kill_restore_at_a_point(tmp_path: Path, saved_big: tuple[SampleStore, Path, Path],
                                 point: str, count: int, mode: list[str]) -> None:
    _kill_restore(tmp_path, saved_big, f"{point}:{count}", None, mode)


@MODES
@pytest.mark.parametrize("seed", range(TIMED_KILLS))
def test_kill_restore_at_a_random_moment(tmp_path: Path,
                                         saved_big: tuple[SampleStore, Path, Path],
                                         seed: int, mode: list[str]) -> None:
    _kill_restore(tmp_path, saved_big, None, random.Random(100 + seed).uniform(0.15, 0.32),
                  mode)


def test_the_harness_kills_at_least_fifty_times() -> None:
    assert len(SAVE_POINTS) + len(RESTORE_POINTS) + 2 * TIMED_KILLS >= 50
