"""Bad input through the real CLI: each case one line naming the item, its own exit code,
nothing registered for the affected item or anything that references it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
import zstandard

from incstore import db
from incstore.demo import rows
from incstore.errors import (
    ChunkCorruptError,
    ChunkMissingError,
    DatabaseError,
    LockedError,
    ManifestError,
    NarFormatError,
    PartialFailureError,
    StoreError,
    StoreHashMismatchError,
)
from incstore.store import Store

from .conftest import SampleStore, run, validate_manifest
from .manifests import dump, load
from .test_nar import HOSTILE


def with_referrers(doc: dict, path: str) -> set[str]:  # type: ignore[type-arg]
    """`path` and every item that references it, transitively."""
    bad = {path}
    grew = True
    while grew:
        more = {i["path"] for i in doc["items"] if set(i["references"]) & bad}
        grew = not more <= bad
        bad |= more
    return bad


def referenced_item(doc: dict) -> dict:  # type: ignore[type-arg]
    """An item that some other item references, so that failures must propagate."""
    refs = {r for i in doc["items"] for r in i["references"] if r != i["path"]}
    return next(i for i in doc["items"] if i["path"] in refs)


def chunk_file(cache: Path, item: dict) -> Path:  # type: ignore[type-arg]
    return cache / "nar" / f"{item['chunk']['key']}.nar.zst"


def restore(manifest: Path, cache: Path, prefix: Path, *extra: str | Path):  # type: ignore[no-untyped-def]
    return run("restore", "--manifest", manifest, "--cache", cache, "--prefix", prefix, *extra)


def assert_failed_cleanly(r, code: int, doc: dict, bad_path: str, prefix: Path) -> None:  # type: ignore[no-untyped-def,type-arg]
    assert r.code == code, (r.code, r.err)
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert any(bad_path in ln for ln in errors), r.err
    bad = with_referrers(doc, bad_path)
    registered = set(rows(Store(prefix, db.GUIX).default_db))
    assert not registered & bad
    # unaffected items still restore
    assert registered == {i["path"] for i in doc["items"]} - bad
    assert not list((prefix / "gnu/store").glob(".incstore-tmp-*"))
    for path in bad:
        assert not Store(prefix, db.GUIX).exists(path) or path != bad_path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_flipped_byte_in_a_chunk(tmp_path: Path, saved: tuple[SampleStore, Path, Path],
                                 where: str) -> None:
    _, cache, manifest = saved
    doc = load(manifest)
    item = referenced_item(doc)
    f = chunk_file(cache, item)
    size = f.stat().st_size
    flip_byte(f, {"header": 5, "middle": size // 2, "end": size - 2}[where])
    r = restore(manifest, cache, tmp_path / "dst")
    assert_failed_cleanly(r, ChunkCorruptError.exit_code, doc, item["path"], tmp_path / "dst")


def test_truncated_chunk(tmp_path: Path, saved: tuple[SampleStore, Path, Path]) -> None:
    _, cache, manifest = saved
    doc = load(manifest)
    item = referenced_item(doc)
    f = chunk_file(cache, item)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    r = restore(manifest, cache, tmp_path / "dst")
    assert_failed_cleanly(r, ChunkCorruptError.exit_code, doc, item["path"], tmp_path / "dst")


def _recompress(doc: dict, item: dict, cache: Path, nar_bytes: bytes, *,  # type: ignore[type-arg]
                extra: bytes = b"", keep_hash: bool = True) -> None:
    """Replace an item's chunk by another zstd frame; the manifest follows the chunk (size and
    xxh3) so that only the deeper checks can catch it."""
    # no content size in the header, like incstore's own chunks, so that only the NAR check
    # can tell
    data = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(
        nar_bytes) + extra
    f = chunk_file(cache, item)
    f.write_bytes(data)
    item["chunk"]["size"] = len(data)
    item["chunk"]["xxh3_128"] = xxhash.xxh3_128(data).hexdigest()
    if not keep_hash:
        import hashlib

        item["nar_hash"] = "sha256:" + hashlib.sha256(nar_bytes).hexdigest()
        item["nar_size"] = len(nar_bytes)


def test_trailing_garbage_after_the_frame(tmp_path: Path,
                                          saved: tuple[SampleStore, Path, Path]) -> None:
    _, cache, manifest = saved
    doc = load(manifest)
    item = referenced_item(doc)
    f = chunk_file(cache, item)
    original = zstandard.ZstdDecompressor().decompressobj().decompress(f.read_bytes())
    _recompress(doc, item, cache, original, extra=b"garbage after the frame")
    dump(manifest, doc)
    r = restore(manifest, cache, tmp_path / "dst")
    assert_failed_cleanly(r, ChunkCorruptError.exit_code, doc, item["path"], tmp_path / "dst")


def test_frame_that_decompresses_to_another_nar(tmp_path: Path,
                                                saved: tuple[SampleStore, Path, Path]) -> None:
    _, cache, manifest = saved
    doc = load(manifest)
    item = referenced_item(doc)
    other = next(i for i in doc["items"] if i is not item)
    other_chunk = chunk_file(cache, other).read_bytes()
    other_nar = zstandard.ZstdDecompressor().decompressobj().decompress(other_chunk)
    _recompress(doc, item, cache, other_nar)
    dump(manifest, doc)
    r = restore(manifest, cache, tmp_path / "dst")
    assert_failed_cleanly(r, ChunkCorruptError.exit_code, doc, item["path"], tmp_path / "dst")
    assert "NAR hash" in r.err


def test_wrong_hash_in_the_manifest(tmp_path: Path, saved: tuple[SampleStore, Path, Path]) -> None:
    _, cache, manifest = saved
    doc = load(manifest)
    item = referenced_item(doc)
    item["nar_hash"] = "sha256:" + "0" * 64
    dump(manifest, doc)
    r = restore(manifest, cache, tmp_path / "dst")
    assert_failed_cleanly(r, ChunkCorruptError.exit_code, doc, item["path"], tmp_path / "dst")


def test_missing_chunk(tmp_path: Path, saved: tuple[SampleStore, Path, Path]) -> None:
    _, cache, manifest = saved
    doc = load(manifest)
    item = referenced_item(doc)
    chunk_file(cache, item).unlink()
    r = restore(manifest, cache, tmp_path / "dst")
    assert_failed_cleanly(r, ChunkMissingError.exit_code, doc, item["path"], tmp_path / "dst")


@pytest.mark.parametrize("case", ["dotdot", "slash", "absolute", "unsorted", "duplicate",
                                  "write-through-symlink", "huge-length", "bad-padding"])
def test_hostile_nar_inside_a_valid_chunk(tmp_path: Path, saved: tuple[SampleStore, Path, Path],
                                          case: str) -> None:
    _, cache, manifest = saved
    doc = load(manifest)
    item = referenced_item(doc)
    _recompress(doc, item, cache, HOSTILE[case], keep_hash=False)
    dump(manifest, doc)
    outside = sorted(p.name for p in tmp_path.iterdir())
    r = restore(manifest, cache, tmp_path / "dst")
    # a NAR that declares more than its recorded size is stopped there, as a chunk that does
    # not hold the manifest's NAR; the others are refused as hostile archives
    code = ChunkCorruptError.exit_code if case == "huge-length" else NarFormatError.exit_code
    assert_failed_cleanly(r, code, doc, item["path"], tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*outside, "dst"])
    assert not (tmp_path / "dst" / "gnu" / "evil").exists()


def test_several_kinds_of_failure_give_the_partial_code(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path]
) -> None:
    _, cache, manifest = saved
    doc = load(manifest)
    first, second = doc["items"][0], doc["items"][-1]
    chunk_file(cache, first).unlink()
    flip_byte(chunk_file(cache, second), chunk_file(cache, second).stat().st_size // 2)
    r = restore(manifest, cache, tmp_path / "dst")
    assert r.code == PartialFailureError.exit_code, r.err
    assert first["path"] in r.err and second["path"] in r.err


def _edit(doc: dict, case: str) -> dict:  # type: ignore[type-arg]
    item = referenced_item(doc)
    if case == "outside-store":
        item["path"] = "/etc/" + item["path"].split("/")[-1]
    elif case == "malformed-path":
        item["path"] = item["path"] + "/../../etc"
    elif case == "not-closed":
        doc["items"] = [i for i in doc["items"] if i is not item]
    elif case == "unknown-version":
        doc["version"] = 99
    elif case == "duplicate":
        doc["items"].append(dict(item))
        doc["items"].sort(key=lambda i: i["path"])
    elif case == "bad-key":
        item["chunk"]["key"] = "../../../etc/passwd"
    elif case == "key-of-another-path":
        item["chunk"]["key"] = next(i for i in doc["items"] if i is not item)["chunk"]["key"]
    elif case == "empty-deriver":
        item["deriver"] = ""
    return doc


@pytest.mark.parametrize("case", ["outside-store", "malformed-path", "not-closed",
                                  "unknown-version", "duplicate", "bad-key",
                                  "key-of-another-path", "empty-deriver"])
def test_tampered_manifest_is_refused_before_anything_is_written(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path], case: str
) -> None:
    _, cache, manifest = saved
    dump(manifest, _edit(load(manifest), case))
    r = restore(manifest, cache, tmp_path / "dst")
    assert r.code == ManifestError.exit_code, r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "dst").exists()


def test_invalid_json_manifest(tmp_path: Path, saved: tuple[SampleStore, Path, Path]) -> None:
    _, cache, manifest = saved
    manifest.write_text(manifest.read_text()[:100])
    r = restore(manifest, cache, tmp_path / "dst")
    assert r.code == ManifestError.exit_code
    assert "invalid JSON" in r.err and str(manifest) in r.err


def test_db_that_is_not_a_daemon_db(tmp_path: Path, saved: tuple[SampleStore, Path, Path]) -> None:
    _, cache, manifest = saved
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("create table t (x)")
    conn.commit()
    conn.close()
    r = restore(manifest, cache, tmp_path / "dst", "--db", other)
    assert r.code == DatabaseError.exit_code
    assert "not a Guix or Nix daemon DB" in r.err
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    r = run("save", "--db", garbage, "--manifest", tmp_path / "m.json", "--cache", cache)
    assert r.code == DatabaseError.exit_code, r.err
    assert str(garbage) in r.err


def test_db_with_unknown_schema_version(tmp_path: Path, guix_store: SampleStore) -> None:
    (guix_store.db_path.parent / "schema").write_text("8")
    r = run("save", "--db", guix_store.db_path, "--manifest", tmp_path / "m.json",
            "--cache", tmp_path / "c", "--prefix", guix_store.prefix)
    assert r.code == DatabaseError.exit_code
    assert "schema version 8" in r.err


@pytest.mark.parametrize("extra", [b"tampered", b"x" * (2 << 20)], ids=["small", "grew-2MiB"])
def test_save_refuses_an_item_whose_contents_changed(
    tmp_path: Path, guix_store: SampleStore, extra: bytes
) -> None:
    snapshot = db.read_snapshot(guix_store.db_path)
    refs = {r for i in snapshot.infos.values() for r in i.references if r != i.path}
    victim = next(p for p in sorted(refs) if Store(guix_store.prefix, db.GUIX).physical(p).is_dir())
    readme = Store(guix_store.prefix, db.GUIX).physical(victim) / "share" / "refs"
    readme.chmod(0o644)
    readme.write_bytes(readme.read_bytes() + extra)
    r = run("save", "--db", guix_store.db_path, "--prefix", guix_store.prefix,
            "--cache", tmp_path / "c", "--manifest", tmp_path / "m.json")
    assert r.code == StoreHashMismatchError.exit_code, r.err
    assert victim in r.err
    key = victim.split("/")[-1][:32]
    assert not (tmp_path / "c" / "nar" / f"{key}.nar.zst").exists()
    assert not (tmp_path / "c" / f"{key}.narinfo").exists()
    assert not [p for p in (tmp_path / "c" / "nar").iterdir() if p.name.startswith(".tmp")]
    doc = validate_manifest(tmp_path / "m.json")
    saved_paths = {i["path"] for i in doc["items"]}
    assert victim not in saved_paths
    for item in doc["items"]:
        assert set(item["references"]) <= saved_paths


def test_a_failed_save_keeps_the_named_manifest_it_would_shrink(
        tmp_path: Path, guix_store: SampleStore) -> None:
    cache = tmp_path / "c"
    args = ("save", "--db", guix_store.db_path, "--prefix", guix_store.prefix, "--cache", cache,
            "--name", "w", "--json")
    assert run(*args).code == 0
    before = (cache / "manifests" / "w.json").read_bytes()
    snapshot = db.read_snapshot(guix_store.db_path)
    refs = {r for i in snapshot.infos.values() for r in i.references if r != i.path}
    victim = next(p for p in sorted(refs) if Store(guix_store.prefix, db.GUIX).physical(p).is_dir())
    changed = Store(guix_store.prefix, db.GUIX).physical(victim) / "share" / "refs"
    changed.chmod(0o644)
    changed.write_bytes(changed.read_bytes() + b"tampered")
    # its chunk gone from the chunk store, the save must read the damaged item, and fails
    key = victim.split("/")[-1][:32]
    (cache / "nar" / f"{key}.nar.zst").unlink()
    (cache / f"{key}.narinfo").unlink()
    r = run(*args)
    assert r.code == StoreHashMismatchError.exit_code, r.err
    assert r.json()["manifest_written"] is False
    assert "previous manifest is kept" in r.json()["manifest_not_written"]
    assert (cache / "manifests" / "w.json").read_bytes() == before


def test_a_save_without_its_store_directory_is_one_line(tmp_path: Path,
                                                         guix_store: SampleStore) -> None:
    """--prefix forgotten: the DB names /gnu/store paths that are not here. One line naming
    the directory and --prefix, not one per item, and no manifest written."""
    cache = tmp_path / "c"
    r = run("save", "--db", guix_store.db_path, "--cache", cache, "--name", "w",
            "--prefix", tmp_path / "nowhere")
    assert r.code == StoreError.exit_code, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert str(tmp_path / "nowhere" / "gnu" / "store") in r.err and "--prefix" in r.err
    assert not (cache / "manifests" / "w.json").exists()


@pytest.fixture
def daemon_session(tmp_path: Path) -> Iterator[Path]:
    """Another process holding big-lock shared, as every guix-daemon session does."""
    db_dir = tmp_path / "dst" / "var" / "guix" / "db"
    db_dir.mkdir(parents=True)
    ready = tmp_path / "ready"
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(db_dir / 'big-lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.lockf(fd, fcntl.LOCK_SH)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(500):
        if ready.exists():
            break
        time.sleep(0.01)
    try:
        yield tmp_path / "dst"
    finally:
        proc.kill()
        proc.wait()


def test_swap_refuses_while_a_daemon_session_holds_big_lock(
    tmp_path: Path, saved: tuple[SampleStore, Path, Path], daemon_session: Path
) -> None:
    src, cache, manifest = saved
    target = daemon_session
    # the target has a DB already, as a running daemon's store would
    db.create(Store(target, db.GUIX).default_db, db.GUIX)
    before = Store(target, db.GUIX).default_db.read_bytes()
    r = restore(manifest, cache, target, "--db-mode", "swap")
    assert r.code == LockedError.exit_code, r.err
    assert "big-lock" in r.err and len(r.err.strip().splitlines()) == 1
    assert Store(target, db.GUIX).default_db.read_bytes() == before
    # refused before anything was extracted
    assert not [p for p in (target / "gnu" / "store").iterdir() if not p.name.endswith(".lock")]
    r = restore(manifest, cache, target)  # auto: registers in the live DB instead
    assert r.code == 0, r.err
    assert rows(Store(target, db.GUIX).default_db) == rows(src.db_path)


def test_fresh_db_from_the_real_schema(tmp_path: Path) -> None:
    path = tmp_path / "db" / "db.sqlite"
    path.parent.mkdir()
    db.create(path, db.GUIX)
    assert (path.parent / "schema").read_bytes() == b"7"
    conn = sqlite3.connect(path)
    names = {r[0] for r in conn.execute("select name from sqlite_master")}
    conn.close()
    assert {"ValidPaths", "Refs", "DerivationOutputs", "FailedPaths", "IndexReferrer",
            "IndexReference", "IndexDerivationOutputs", "DeleteSelfRefs"} <= names


def test_a_narinfo_that_cannot_be_staged_fails_only_its_item(
    tmp_path: Path, guix_store: SampleStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staging a narinfo fails (a full disk, say): that item fails with one line naming it,
    its chunk is not published, nothing is left under a temporary name, and the manifest
    stays closed (what references it is left out too)."""
    from incstore import backend
    from incstore.errors import StoreError
    from incstore.save import execute_save, plan_save

    snapshot = db.read_snapshot(guix_store.db_path)
    victim = next(p for p in sorted(snapshot.infos)
                  if any(p in i.references for q, i in snapshot.infos.items() if q != p))
    key = victim.split("/")[-1][:32]
    real = backend.LocalBackend.stage_bytes

    def stage_bytes(self: backend.LocalBackend, name: str, data: bytes) -> backend.Staged:
        if name == f"{key}.narinfo":
            raise OSError(28, "No space left on device")
        return real(self, name, data)

    monkeypatch.setattr(backend.LocalBackend, "stage_bytes", stage_bytes)
    cache = tmp_path / "c"
    result = execute_save(plan_save(guix_store.db_path, guix_store.prefix, cache),
                          tmp_path / "m.json", jobs=2)
    error = result.error()
    assert isinstance(error, StoreError) and error.exit_code == StoreError.exit_code
    assert victim in str(error)
    [failed] = result.failed
    assert failed.item == victim and "cannot write its narinfo" in str(failed)
    assert "\n" not in str(failed)
    assert not (cache / "nar" / f"{key}.nar.zst").exists()
    assert not (cache / f"{key}.narinfo").exists()
    assert not [p for p in [*cache.iterdir(), *(cache / "nar").iterdir()]
                if p.name.startswith(".tmp")]
    saved = {i[0] for i in json.loads((tmp_path / "m.json").read_text())["items"]}
    assert victim not in saved
    assert not [p for p in saved if victim in snapshot.infos[p].references]
