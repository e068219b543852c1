"""S3 specifics against real servers on loopback: pagination, clear errors (missing bucket,
bad credentials, unreachable or frozen endpoint), concurrent saves, and a server killed and
restarted in the middle of a restore."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from incstore import db
from incstore.backend import open_backend
from incstore.chunkstore import ChunkStore
from incstore.demo import rows
from incstore.errors import RemoteError
from incstore.store import Store
from incstore.verify import verify_store

from .conftest import Location, make_sample, run, validate_manifest
from .s3server import CREDENTIALS, S3Server, available, free_port

pytestmark = pytest.mark.skipif(not available("moto"), reason="needs the test extras")


@pytest.fixture
def s3(location: Location) -> Location:
    if location.kind != "s3":
        pytest.skip("S3 only")
    return location


@pytest.mark.parametrize("location", ["s3"], indirect=True)
def test_listing_past_a_thousand_keys(s3: Location) -> None:
    b = open_backend(s3.url)
    names = [f"nar/{n:032d}.nar.zst".replace("e", "0") for n in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: b.write(n, b"x"), names))
    assert len(b.listdir("nar")) == 1100
    assert len(ChunkStore(s3.url).chunk_files()) == 1100


def test_missing_bucket_is_a_clear_error(moto: S3Server, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in moto.env.items():
        monkeypatch.setenv(k, v)
    src = make_sample(tmp_path / "src", items=2, seed=91)
    r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", "s3://no-such-bucket/x",
            "--name", "a")
    assert r.code == RemoteError.exit_code
    assert "bucket no-such-bucket does not exist" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_unreachable_endpoint_is_a_clear_error(tmp_path: Path) -> None:
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    start = time.monotonic()
    r = run("restore", "--name", "a", "--cache", "s3://b/x", "--prefix", tmp_path / "d", env=env)
    assert r.code == RemoteError.exit_code
    assert "cannot reach" in r.err and len(r.err.strip().splitlines()) == 1
    assert time.monotonic() - start < 60


def test_bad_credentials_are_a_clear_error(tmp_path: Path) -> None:
    server = S3Server("moto")
    # moto checks signatures once its first (bucket-creating) request is done
    old = os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "2"  # the start probe, then the bucket
    try:
        server.start()
    finally:
        if old is None:
            del os.environ["INITIAL_NO_AUTH_ACTION_COUNT"]
        else:
            os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = old
    try:
        server.create_bucket("locked")
        env = {**server.env, "AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "wrong"}
        r = run("restore", "--name", "a", "--cache", "s3://locked/x", "--prefix",
                tmp_path / "d", env=env)
        assert r.code == RemoteError.exit_code
        assert "bad or missing credentials" in r.err
    finally:
        server.stop()


def test_a_frozen_server_hits_the_timeout(tmp_path: Path) -> None:
    server = S3Server("moto").start()
    try:
        server.create_bucket("frozen")
        src = make_sample(tmp_path / "src", items=3, seed=92)
        env = {**server.env, "INCSTORE_S3_TIMEOUT": "2"}
        assert run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache",
                   "s3://frozen/c", "--name", "a", env=env).code == 0
        server.freeze()
        start = time.monotonic()
        r = run("restore", "--name", "a", "--cache", "s3://frozen/c", "--prefix",
                tmp_path / "d", env=env)
        elapsed = time.monotonic() - start
        assert r.code == RemoteError.exit_code, r.err
        assert len(r.err.strip().splitlines()) == 1
        assert elapsed < 60
        assert not (tmp_path / "d" / "var" / "guix" / "db" / "db.sqlite").exists()
    finally:
        server.thaw()
        server.stop()


@pytest.mark.parametrize("location", ["s3"], indirect=True)
def test_two_concurrent_saves_of_overlapping_items(s3: Location, tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=14, seed=93)
    procs = [subprocess.Popen([sys.executable, "-m", "incstore", "save", "--db", src.db_path,
                               "--prefix", src.prefix, "--cache", s3.url, "--name", name,
                               "--level", level], stderr=subprocess.PIPE, text=True)
             for name, level in (("a", "3"), ("b", "9"))]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
    chunks = ChunkStore(s3.url)
    assert len(chunks.chunk_files()) == len(src.infos)
    r = run("check", "--cache", s3.url, "--full", "--json")
    assert r.code == 0 and r.json()["ok"], r.out


def test_server_killed_and_restarted_during_a_restore(tmp_path: Path) -> None:
    if not available("localbucket"):
        pytest.skip("needs localbucket (test extras)")
    port = free_port()
    server = S3Server("localbucket", data=tmp_path / "bucketdata", port=port).start()
    try:
        server.create_bucket("persist")
        from incstore.sample import SampleSpec, build

        src_prefix = tmp_path / "src"
        build(src_prefix, db.GUIX, SampleSpec(items=40, blob_bytes=4 << 20, modules=4, seed=94))
        src = Store(src_prefix, db.GUIX)
        env = {**server.env, "INCSTORE_S3_TIMEOUT": "5"}
        url = "s3://persist/c"
        r = run("save", "--db", src.default_db, "--prefix", src_prefix, "--cache", url,
                "--name", "a", "--manifest", tmp_path / "m.json", env=env)
        assert r.code == 0, r.err
        dst = tmp_path / "dst"
        proc = subprocess.Popen([sys.executable, "-m", "incstore", "restore", "--name", "a",
                                 "--cache", url, "--prefix", str(dst), "--jobs", "1"],
                                env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
        # kill the server as soon as the restore has items in flight
        store_dir = dst / "gnu" / "store"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if store_dir.is_dir() and any(store_dir.iterdir()):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the restore ended before the server was killed"
        server.stop()
        time.sleep(1.0)
        server.start()
        _, err = proc.communicate(timeout=300)
        # it completed (its retries spanned the restart) or failed with a clear error
        assert proc.returncode in (0, RemoteError.exit_code), err
        store = Store(dst, db.GUIX)
        if store.default_db.exists():
            report = verify_store(store, store.default_db)
            assert report.ok, report.problems  # nothing unverified is registered
        r = run("restore", "--name", "a", "--cache", url, "--prefix", dst, env=env)
        assert r.code == 0, r.err
        assert rows(store.default_db) == rows(src.default_db)
        assert verify_store(store, store.default_db).ok
        validate_manifest(tmp_path / "m.json")
    finally:
        server.stop()
