"""One conformance suite for every chunk store backend (a local directory, and S3 through a
real S3-protocol server on loopback), as restic and borgstore test theirs."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from incstore import db
from incstore.backend import AlreadyExists, open_backend
from incstore.chunkstore import ChunkStore
from incstore.errors import ChunkCorruptError, ChunkMissingError, ChunkStoreError
from incstore.store import Store
from incstore.verify import verify_store

from .conftest import Location, make_sample, run, validate_manifest


def test_blob_operations(location: Location) -> None:
    b = open_backend(location.url)
    assert b.stat("a.narinfo") is None
    with pytest.raises(FileNotFoundError):
        b.read("a.narinfo")
    b.write("a.narinfo", b"one")
    b.write("a.narinfo", b"two")  # plain writes replace
    assert b.read("a.narinfo") == b"two"
    with b.create("nar/x.nar.zst") as f:
        f.write(b"first")
    with pytest.raises(AlreadyExists), b.create("nar/x.nar.zst") as f:
        f.write(b"second")
    assert b.read("nar/x.nar.zst") == b"first"  # write-once: the first writer won
    entry = b.stat("nar/x.nar.zst")
    assert entry is not None and entry.size == 5
    assert sorted(e.name for e in b.listdir("")) == ["a.narinfo"]
    assert [e.name for e in b.listdir("nar")] == ["x.nar.zst"]
    b.delete("nar/x.nar.zst")
    b.delete("nar/x.nar.zst")  # deleting what is gone is fine
    assert b.listdir("nar") == []
    for bad in ("../x", "/etc/passwd", "a/../../b", "", "a//b"):
        with pytest.raises(ChunkStoreError):
            b.read(bad)


def test_a_failed_create_leaves_nothing(location: Location) -> None:
    b = open_backend(location.url)
    with pytest.raises(RuntimeError), b.create("nar/y.nar.zst") as f:
        f.write(b"partial")
        raise RuntimeError("writer died")
    assert b.stat("nar/y.nar.zst") is None


def test_large_blob_streams_in_and_out_with_bounded_reads(location: Location) -> None:
    b = open_backend(location.url)
    data = os.urandom(1 << 20) * 20  # 20 MiB: multipart on S3
    with b.create("nar/big.nar.zst") as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i : i + (1 << 20)])
    reader = b.open("nar/big.nar.zst")
    got = io.BytesIO()
    while block := reader.read(1 << 18):
        assert len(block) <= 1 << 18
        got.write(block)
    reader.close()
    assert got.getvalue() == data


def test_racing_creates_of_one_blob_leave_exactly_one(location: Location) -> None:
    b = open_backend(location.url)
    outcomes: list[str] = []

    def writer(n: int) -> None:
        try:
            with b.create("nar/race.nar.zst") as f:
                f.write(bytes([n]) * 1000)
            outcomes.append("won")
        except AlreadyExists:
            outcomes.append("lost")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("won") == 1
    data = b.read("nar/race.nar.zst")
    assert len(data) == 1000 and len(set(data)) == 1


def test_save_restore_incremental_gc_check_stats(tmp_path: Path, location: Location) -> None:
    src = make_sample(tmp_path / "src", items=10, seed=81)
    cache = location.url
    r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
            "--name", "a", "--manifest", tmp_path / "a.json", "--json")
    assert r.code == 0, r.err
    assert r.json()["written"] == len(src.infos)
    validate_manifest(tmp_path / "a.json")
    dst = tmp_path / "dst"
    r = run("restore", "--name", "a", "--cache", cache, "--prefix", dst, "--json")
    assert r.code == 0, r.err
    assert verify_store(Store(dst, db.GUIX), Store(dst, db.GUIX).default_db).ok
    # incremental: three new items, three new chunks
    from incstore import sample

    spec = sample.SampleSpec(items=3, blob_bytes=16 << 10, modules=6)
    new = sample.add_items(src.prefix, db.GUIX, 3, seed=82, spec=spec, start=901)
    r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
            "--name", "b", "--json")
    assert r.code == 0, r.err
    assert r.json()["written"] == len(new)
    stats = run("stats", "--cache", cache, "--json").json()
    assert stats["manifests"]["a"]["items"] == len(src.infos)
    assert stats["manifests"]["b"]["items"] == len(src.infos) + len(new)
    assert stats["overlap"]["a"]["b"] == stats["manifests"]["a"]["chunk_bytes"]
    assert run("check", "--cache", cache, "--full").code == 0
    # dropping b leaves exactly its own chunks to the sweep
    b_only = {i.path.split("/")[-1][:32] for i in new}
    chunks = ChunkStore(cache)
    chunks.delete_manifest("b")
    r = run("gc", "--cache", cache, "--grace-minutes", "0", "--json")
    assert r.code == 0, r.err
    assert set(r.json()["sweep_chunks"]) == b_only
    assert set(chunks.chunk_files()) == {i["chunk"]["key"] for i in
                                         validate_manifest(tmp_path / "a.json")["items"]}
    assert run("gc", "--cache", cache, "--json").json()["changed"] is False
    # damage: check --full names a flipped chunk, a missing chunk and an orphan
    doc = validate_manifest(tmp_path / "a.json")
    flipped, gone = doc["items"][0]["chunk"]["key"], doc["items"][1]["chunk"]["key"]
    data = bytearray(chunks.backend.read(ChunkStore.chunk_name(flipped)))
    data[len(data) // 2] ^= 1
    location.damage(ChunkStore.chunk_name(flipped), bytes(data))
    location.remove(ChunkStore.chunk_name(gone))
    orphan = "0" * 32
    chunks.backend.write(ChunkStore.chunk_name(orphan), b"not referenced")
    r = run("check", "--cache", cache, "--full", "--json")
    assert r.code == 10, r.err
    out = r.json()
    assert any(flipped in e for e in out["corrupt"])
    assert any(gone in e for e in out["missing"])
    assert orphan in out["orphans"]
    assert ChunkCorruptError.exit_code != ChunkMissingError.exit_code


def test_restore_fetches_only_what_is_missing(tmp_path: Path, location: Location) -> None:
    src = make_sample(tmp_path / "src", items=10, seed=83)
    cache = location.url
    assert run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
               "--name", "a").code == 0
    dst = tmp_path / "dst"
    assert run("restore", "--name", "a", "--cache", cache, "--prefix", dst).code == 0
    # with every chunk gone from the store, a restore that needs nothing still succeeds
    for key in ChunkStore(cache).chunk_files():
        location.remove(ChunkStore.chunk_name(key))
    r = run("restore", "--name", "a", "--cache", cache, "--prefix", dst, "--json")
    assert r.code == 0, r.err
    assert r.json()["extracted"] == 0
