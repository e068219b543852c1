"""The transfer directory as hostile input: what actions/cache extracted was written by whoever
could write a cache entry, and the restore step reads it as root. Symlinked directories and
blobs, FIFOs and devices as records, oversized records, records under another key's name, a
transfer directory that is itself a symlink; then a fuzz target over the merge."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incstore import transfer
from incstore.transfer import ENTRY_DIR, Entry, merge, read_entries
from incstore.xferdir import MAX_RECORD_BYTES, TransferDir

from .test_hostile import make_outside, snapshot


def record(key: str, files: list[str], deleted: list[str] = (), **over: Any) -> bytes:  # type: ignore[assignment]
    doc = Entry(key, "slot", 0, 1, "n0", list(files), list(deleted)).to_json()
    doc.update(over)
    return json.dumps(doc).encode()


def put_record(xfer: Path, key: str, data: bytes) -> Path:
    path = xfer / ENTRY_DIR / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def hang(*_: object) -> None:
        raise TimeoutError(f"took more than {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A transfer directory, an empty chunk store, and a sentinel tree outside both that must
    come through every test unchanged."""
    xfer, cache = tmp_path / "xfer", tmp_path / "cache"
    xfer.mkdir()
    outside = make_outside(tmp_path / "outside")
    (outside / "manifests").mkdir()
    (outside / "manifests" / "secret.json").write_text("the host's secret\n")
    before = snapshot(outside)
    yield xfer, cache, outside
    assert snapshot(outside) == before, "something outside the transfer directory changed"


def test_a_symlinked_directory_never_moves_a_file_from_outside(
        world: tuple[Path, Path, Path]) -> None:
    xfer, cache, outside = world
    (xfer / "manifests").symlink_to(outside / "manifests")
    put_record(xfer, "k-g000000-s01", record("k-g000000-s01", ["manifests/secret.json"]))
    merged = merge(xfer, cache)
    assert [e.key for e in merged.entries] == ["k-g000000-s01"]
    assert any("manifests is not a directory" in p for p in merged.problems), merged.problems
    assert not (cache / "manifests" / "secret.json").exists()
    assert (outside / "manifests" / "secret.json").exists()
    assert list(xfer.iterdir()) == []  # the symlink itself went, its target stayed


def test_a_symlinked_blob_is_refused_and_its_target_stays(world: tuple[Path, Path, Path]
                                                          ) -> None:
    xfer, cache, outside = world
    (xfer / "nar").mkdir()
    (xfer / "nar" / "a.nar.zst").symlink_to(outside / "manifests" / "secret.json")
    (xfer / "good.narinfo").write_text("StorePath: x\n")
    put_record(xfer, "k-g000000-s01", record("k-g000000-s01", ["nar/a.nar.zst",
                                                               "good.narinfo"]))
    merged = merge(xfer, cache)
    assert any("nar/a.nar.zst is not a regular file" in p for p in merged.problems)
    assert not os.path.lexists(cache / "nar" / "a.nar.zst")
    assert (cache / "good.narinfo").read_text() == "StorePath: x\n"


def test_deletions_never_reach_outside_the_chunk_store(world: tuple[Path, Path, Path]) -> None:
    xfer, cache, outside = world
    cache.mkdir()
    (cache / "manifests").symlink_to(outside / "manifests")
    put_record(xfer, "k-g000000-s01", record("k-g000000-s01", [], ["manifests/secret.json"]))
    merged = merge(xfer, cache)
    assert merged.problems  # the symlinked directory of the chunk store is not followed


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "oversized", "socket"])
def test_a_record_that_is_not_a_bounded_regular_file_is_refused_at_once(
        world: tuple[Path, Path, Path], kind: str) -> None:
    import socket

    xfer, _, _ = world
    where = xfer / ENTRY_DIR / "k-base-g000000.json"
    where.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(where)
    elif kind == "dev-zero":
        where.symlink_to("/dev/zero")
    elif kind == "directory":
        where.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(where))
        s.close()
    else:
        with open(where, "wb") as f:
            f.truncate(MAX_RECORD_BYTES + 1)  # sparse: costs no disk
    with deadline(10):
        entries, problems = read_entries(xfer)
    assert entries == [] and len(problems) == 1 and "k-base-g000000.json" in problems[0]


def test_records_must_name_their_own_key_and_blob_names_that_travel(
        world: tuple[Path, Path, Path]) -> None:
    xfer, _, _ = world
    put_record(xfer, "k-g000000-s01", record("k-g000000-s02", []))  # another key's record
    put_record(xfer, "k-g000000-s03", record("k-g000000-s03", ["../../etc/passwd"]))
    put_record(xfer, "k-g000000-s04", record("k-g000000-s04", [], ["quarantine/x"]))
    put_record(xfer, "k-g000000-s05", b"\xff" * 40)
    put_record(xfer, "k-g000000-s06", record("k-g000000-s06", [], generation="9" * 5000))
    (xfer / ENTRY_DIR / "bad name;rm.json").write_text("{}")
    entries, problems = read_entries(xfer)
    assert entries == []
    assert len(problems) == 6, problems


def test_a_transfer_directory_that_is_a_symlink_is_replaced_not_followed(
        world: tuple[Path, Path, Path]) -> None:
    xfer, cache, outside = world
    xfer.rmdir()
    xfer.symlink_to(outside)
    entries, problems = read_entries(xfer)
    assert entries == [] and problems == [f"{xfer} is not a directory (Not a directory)"]
    merged = merge(xfer, cache)
    assert merged.entries == []
    assert xfer.is_dir() and not xfer.is_symlink() and list(xfer.iterdir()) == []


def _step(xfer: Path, tmp: Path, verb: str) -> subprocess.CompletedProcess[str]:
    """The action step as the composite action runs it, in a child with 1 GiB of address
    space (a read without a bound of /dev/zero once took 915 MB and a MemoryError)."""
    env = {**os.environ, "INCSTORE_XFER": str(xfer), "INCSTORE_CACHE": str(tmp / "cache"),
           "INCSTORE_STATE": str(tmp / "state"), "INCSTORE_PREFIX": str(tmp / "target"),
           "INCSTORE_NAME": "w", "INCSTORE_KEY_PREFIX": "k",
           "GITHUB_OUTPUT": str(tmp / "out"), "GITHUB_STEP_SUMMARY": str(tmp / "summary")}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run([sys.executable, "-m", "incstore.actionstep", verb], env=env,
                          capture_output=True, text=True, timeout=60, preexec_fn=limit,
                          check=False)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_the_action_step_neither_hangs_nor_reads_without_bound(tmp_path: Path, kind: str
                                                              ) -> None:
    xfer = tmp_path / "xfer"
    where = xfer / ENTRY_DIR / "k-base-g000000.json"
    where.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(where)
    else:
        where.symlink_to("/dev/zero")
    for verb in ("restore-plan", "restore"):
        started = time.monotonic()
        p = _step(xfer, tmp_path, verb)
        assert time.monotonic() - started < 30
        assert p.returncode == 0, p.stdout + p.stderr
        assert "internal error" not in p.stdout and "Traceback" not in p.stderr
        if verb == "restore":
            assert "refused from the cache entry" in p.stdout, p.stdout
            # the refused record cost a cache miss, nothing more
            assert "hit=false" in (tmp_path / "out").read_text()
        (xfer / ENTRY_DIR).mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(where):
            os.mkfifo(where) if kind == "fifo" else where.symlink_to("/dev/zero")


def test_clear_removes_a_deep_tree_without_following_anything(world: tuple[Path, Path, Path]
                                                              ) -> None:
    xfer, _, outside = world
    deep = xfer
    for _ in range(300):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "to-outside").symlink_to(outside)
    (xfer / "d" / "dir-link").symlink_to(outside / "manifests")
    (xfer / "locked").mkdir()
    (xfer / "locked" / "f").write_text("x")
    (xfer / "locked").chmod(0o555)
    TransferDir(xfer).clear()
    assert list(xfer.iterdir()) == []


# fuzz target ----------------------------------------------------------------------------

NAMES = st.sampled_from(["nar/a.nar.zst", "nar/b.nar.zst", "a.narinfo", "manifests/w.json",
                         "manifests/w.json.sig", "guix/a.narinfo", "nix-cache-info",
                         "nar", "manifests", "guix", "../escape", "nar/../../x",
                         "manifests/pending/p", "quarantine/q", ".tmp-incstore-1-x"])
KINDS = st.sampled_from(["file", "dir", "symlink-outside", "symlink-dir-outside",
                         "symlink-dev-zero", "fifo", "big-sparse"])


def _plant(root: Path, name: str, kind: str, outside: Path) -> None:
    path = root / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path):
            return
        if kind == "file":
            path.write_bytes(b"blob " + name.encode())
        elif kind == "dir":
            path.mkdir()
        elif kind == "symlink-outside":
            path.symlink_to(outside / "manifests" / "secret.json")
        elif kind == "symlink-dir-outside":
            path.symlink_to(outside / "manifests")
        elif kind == "symlink-dev-zero":
            path.symlink_to("/dev/zero")
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            with open(path, "wb") as f:
                f.truncate(MAX_RECORD_BYTES + 1)
    except OSError:
        pass  # a planted file where a directory was wanted, say: part of the mess


RECORDS = st.lists(st.tuples(
    st.sampled_from(["k-base-g000000", "k-g000000-s01", "k-g000000-s02", "k-g000001-s01"]),
    st.one_of(KINDS, st.just("record")),
    st.lists(NAMES, max_size=5), st.lists(NAMES, max_size=3)), max_size=4)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "120")), deadline=None,
          derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(xfer_tree=st.lists(st.tuples(NAMES, KINDS), max_size=8),
       cache_tree=st.lists(st.tuples(NAMES, KINDS), max_size=4), records=RECORDS,
       generation=st.sampled_from([None, 0, 1]))
def test_fuzz_merge(tmp_path_factory: pytest.TempPathFactory,
                    xfer_tree: list[tuple[str, str]], cache_tree: list[tuple[str, str]],
                    records: list[tuple[str, str, list[str], list[str]]],
                    generation: int | None) -> None:
    """Any mess in the transfer directory and the chunk store: the merge returns within a
    second with problems, never an exception; nothing outside changes; the chunk store
    gains only regular files, from inside the transfer directory; the transfer directory
    ends empty."""
    tmp = tmp_path_factory.mktemp("fuzz")
    xfer, cache = tmp / "xfer", tmp / "cache"
    outside = make_outside(tmp / "outside")
    (outside / "manifests").mkdir()
    (outside / "manifests" / "secret.json").write_text("secret")
    for name, kind in xfer_tree:
        _plant(xfer, name, kind, outside)
    for name, kind in cache_tree:
        _plant(cache, name, kind, outside)
    for key, kind, files, deleted in records:
        if kind == "record":
            kind_ok = [n for n in files if transfer.travels(n)]
            put_record(xfer, key, record(key, kind_ok, [n for n in deleted
                                                        if transfer.travels(n)]))
        else:
            _plant(xfer, f"{ENTRY_DIR}/{key}.json", kind, outside)
    xfer.mkdir(exist_ok=True)
    before = snapshot(outside)
    cache_before = {p: p.lstat().st_ino for p in cache.rglob("*")} if cache.exists() else {}
    started = time.monotonic()
    with deadline(10):
        merged = merge(xfer, cache, generation=generation)
    assert time.monotonic() - started < 5
    assert snapshot(outside) == before
    assert all(isinstance(p, str) for p in merged.problems)
    for p in cache.rglob("*"):
        st_ = p.lstat()
        if cache_before.get(p) != st_.st_ino:  # what the merge brought or replaced
            assert stat.S_ISREG(st_.st_mode) or stat.S_ISDIR(st_.st_mode), p
            if stat.S_ISREG(st_.st_mode):
                assert st_.st_size < 1 << 20 and p.read_bytes().startswith(b"blob "), p
    assert xfer.is_dir() and list(xfer.iterdir()) == []
