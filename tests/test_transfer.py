"""Transfer: the cache-entry protocol's policy and merge (chains, siblings, unions), and the
transfer directory as hostile input. What actions/cache extracted was written by whoever
could write a cache entry, and the restore step reads it as root: symlinked directories and
blobs, FIFOs and devices as records, oversized records, records under another key's name, a
transfer directory that is itself a symlink; then a fuzz target over the merge."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
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
from incstore.errors import ChunkStoreError
from incstore.manifest import from_bytes
from incstore.transfer import (
    COMPACT_AT,
    MAX_CHAIN,
    Content,
    Index,
    merge_chain,
    next_chain,
    read_content,
    read_index,
)
from incstore.xferdir import MAX_RECORD_BYTES, TransferDir

from .conftest import make_sample, run
from .test_hostile import make_outside, snapshot

FAMILY = "incstore-x2-linux-x64-guix"


def key(kind: str, n: int) -> str:
    return f"{FAMILY}-{kind}-ns-20261207000000-{n:012x}"


def put_content(xfer: Path, k: str, blobs: dict[str, bytes], deleted: list[str] = (),  # type: ignore[assignment]
                parents: list[str] = (), **over: Any) -> Path:  # type: ignore[assignment]
    """A content entry as actions/cache would extract it; `over` replaces record fields."""
    top = xfer / k
    for name, data in blobs.items():
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_bytes(data)
    top.mkdir(parents=True, exist_ok=True)
    doc = Content(k, "delta", list(parents), sorted(blobs), list(deleted)).to_json()
    doc.update(over)
    (top / "record.json").write_text(json.dumps(doc))
    return top


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


# policy ---------------------------------------------------------------------------------


def test_keys_are_unique_fixed_width_and_never_a_prefix_of_another() -> None:
    fam = transfer.family("Linux", "ARM64", "guix")
    assert fam == "incstore-x2-linux-arm64-guix"
    keys = {transfer.content_key(fam, "ns", transfer.unique("run-1-1-job", now=0))
            for _ in range(200)}
    assert len(keys) == 200 and len({len(k) for k in keys}) == 1
    assert all(transfer.is_key(k) for k in keys)
    assert transfer.index_lookup(fam, "ns") == (f"{fam}-i-ns-", f"{fam}-i-")
    with pytest.raises(ValueError):
        transfer.family("Linux", "x64 --evil", "guix")


def test_next_chain_takes_in_what_a_concurrent_save_added() -> None:
    a, b, c, d = (key("c", n) for n in range(4))
    assert next_chain([a, b], c, base=False) == [a, b, c]
    assert next_chain([a, b], c, base=True) == [c]  # a base holds all it restored
    # the newest index named d, which this save did not see: kept, after ours
    assert next_chain([a, b], c, base=False, newest=[a, b, d]) == [a, b, c, d]
    assert next_chain([a, b], c, base=True, newest=[a, b, d]) == [c, d]
    long = [key("c", 100 + n) for n in range(MAX_CHAIN)]
    assert next_chain([a], c, base=False, newest=long) is None
    assert transfer.is_base_due([]) and transfer.is_base_due([a] * COMPACT_AT)
    assert not transfer.is_base_due([a] * (COMPACT_AT - 1))


def test_a_chain_overlays_oldest_first_and_applies_deletions(tmp_path: Path) -> None:
    xfer, cache = tmp_path / "xfer", tmp_path / "cache"
    a, b = key("c", 1), key("c", 2)
    put_content(xfer, a, {"x.narinfo": b"a", "y.narinfo": b"a", "nar/z.nar.zst": b"a"})
    put_content(xfer, b, {"x.narinfo": b"b"}, ["y.narinfo"], parents=[a])
    merged = merge_chain(xfer, cache, [a, b, key("c", 3)])
    assert merged.applied == [a, b] and merged.missing == [key("c", 3)] and not merged.problems
    assert (cache / "x.narinfo").read_bytes() == b"b"
    assert not (cache / "y.narinfo").exists()
    assert (cache / "nar/z.nar.zst").read_bytes() == b"a"
    assert list(xfer.iterdir()) == []


def _manifest(tmp: Path, items: int, seed: int, name: str = "w") -> bytes:
    src = make_sample(tmp / f"src{seed}", items=items, seed=seed)
    out = tmp / f"m{seed}.json"
    r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", tmp / f"c{seed}",
            "--manifest", out)
    assert r.code == 0, r.err
    return out.read_bytes()


def test_siblings_union_their_manifests_and_keep_each_others_blobs(tmp_path: Path) -> None:
    """Two saves that did not see each other: both wrote manifests/w.json (the union is kept,
    its stale signature dropped), and one's gc deletion of a name the other wrote does not
    apply."""
    xfer, cache = tmp_path / "xfer", tmp_path / "cache"
    base, a, b = key("c", 1), key("c", 2), key("c", 3)
    ma, mb = _manifest(tmp_path, 4, 1), _manifest(tmp_path, 5, 2)
    put_content(xfer, base, {"manifests/w.json": ma, "shared.narinfo": b"old"})
    put_content(xfer, a, {"manifests/w.json": ma, "manifests/w.json.sig": b"sig",
                          "shared.narinfo": b"a"}, parents=[base])
    put_content(xfer, b, {"manifests/w.json": mb}, ["shared.narinfo"], parents=[base])
    merged = merge_chain(xfer, cache, [base, a, b])
    assert merged.unions == ["manifests/w.json"], merged
    union = from_bytes((cache / "manifests/w.json").read_bytes(), "w")
    paths = set(union.paths)
    assert paths == set(from_bytes(ma, "w").paths) | set(from_bytes(mb, "w").paths)
    assert not (cache / "manifests/w.json.sig").exists()
    assert (cache / "shared.narinfo").read_bytes() == b"a"  # b never saw a's write


# the transfer directory as hostile input --------------------------------------------------


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
    k = key("c", 1)
    put_content(xfer, k, {})
    doc = json.loads((xfer / k / "record.json").read_text())
    doc["files"] = ["manifests/secret.json"]
    (xfer / k / "record.json").write_text(json.dumps(doc))
    (xfer / k / "manifests").symlink_to(outside / "manifests")
    merged = merge_chain(xfer, cache, [k])
    assert any("manifests is not a directory" in p for p in merged.problems), merged.problems
    assert not (cache / "manifests" / "secret.json").exists()
    assert list(xfer.iterdir()) == []  # the symlink itself went, its target stayed


def test_a_symlinked_entry_or_blob_is_refused_and_its_target_stays(
        world: tuple[Path, Path, Path]) -> None:
    xfer, cache, outside = world
    k, other = key("c", 1), key("c", 2)
    put_content(xfer, k, {"good.narinfo": b"StorePath: x\n", "nar/a.nar.zst": b"x"})
    (xfer / k / "nar" / "a.nar.zst").unlink()
    (xfer / k / "nar" / "a.nar.zst").symlink_to(outside / "manifests" / "secret.json")
    (xfer / other).symlink_to(outside)  # a whole entry that is a symlink
    merged = merge_chain(xfer, cache, [k, other])
    assert any("nar/a.nar.zst is not a regular file" in p for p in merged.problems)
    assert any(other in p for p in merged.problems) and other in merged.missing
    assert not os.path.lexists(cache / "nar" / "a.nar.zst")
    assert (cache / "good.narinfo").read_text() == "StorePath: x\n"


def test_deletions_never_reach_outside_the_chunk_store(world: tuple[Path, Path, Path]) -> None:
    xfer, cache, outside = world
    cache.mkdir()
    (cache / "manifests").symlink_to(outside / "manifests")
    k = key("c", 1)
    put_content(xfer, k, {}, ["manifests/secret.json"])
    merged = merge_chain(xfer, cache, [k])
    assert merged.problems  # the symlinked directory of the chunk store is not followed


def _plant_special(where: Path, kind: str) -> None:
    where.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(where)
    elif kind == "dev-zero":
        where.symlink_to("/dev/zero")
    elif kind == "directory":
        where.mkdir()
    elif kind == "socket":
        here = os.getcwd()
        os.chdir(where.parent)  # a relative name: the absolute one may pass the 108-byte limit
        try:
            s = socket.socket(socket.AF_UNIX)
            s.bind(where.name)
            s.close()
        finally:
            os.chdir(here)
    else:
        with open(where, "wb") as f:
            f.truncate(MAX_RECORD_BYTES + 1)  # sparse: costs no disk


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "oversized", "socket"])
def test_a_record_that_is_not_a_bounded_regular_file_is_refused_at_once(
        world: tuple[Path, Path, Path], kind: str) -> None:
    xfer, cache, _ = world
    k, i = key("c", 1), key("i", 2)
    _plant_special(xfer / k / "record.json", kind)
    _plant_special(xfer / i / "index.json", kind)
    with deadline(10):
        with pytest.raises(ChunkStoreError):
            read_index(xfer, i)
        with pytest.raises(ChunkStoreError):
            read_content(xfer, k)
        merged = merge_chain(xfer, cache, [k])
    assert merged.applied == [] and len(merged.problems) == 1 and k in merged.problems[0]


def test_records_must_name_their_own_key_and_blob_names_that_travel(
        world: tuple[Path, Path, Path]) -> None:
    xfer, cache, _ = world
    ks = [key("c", n) for n in range(6)]
    put_content(xfer, ks[0], {}, key=ks[1])  # another entry's record
    put_content(xfer, ks[1], {}, files=["../../etc/passwd"])
    put_content(xfer, ks[2], {}, deleted=["quarantine/x"])
    put_content(xfer, ks[3], {}, parents=["not a key"])
    (xfer / ks[4] / "record.json").parent.mkdir()
    (xfer / ks[4] / "record.json").write_bytes(b"\xff" * 40)
    put_content(xfer, ks[5], {}, version=1)
    merged = merge_chain(xfer, cache, ks)
    assert merged.applied == [] and len(merged.problems) == 6, merged.problems
    i = key("i", 9)
    (xfer / i).mkdir()
    for chain in ([ks[0]] * 2, ["x"], [key("c", n) for n in range(MAX_CHAIN + 1)]):
        (xfer / i / "index.json").write_text(json.dumps(Index(i, chain).to_json()))
        with pytest.raises(ChunkStoreError):
            read_index(xfer, i)
    with pytest.raises(ChunkStoreError):
        read_index(xfer, "../../etc")


def test_a_transfer_directory_that_is_a_symlink_is_replaced_not_followed(
        world: tuple[Path, Path, Path]) -> None:
    xfer, cache, outside = world
    xfer.rmdir()
    xfer.symlink_to(outside)
    with pytest.raises(ChunkStoreError, match="is not a directory"):
        read_index(xfer, key("i", 1))
    merged = merge_chain(xfer, cache, [key("c", 1)])
    assert merged.applied == []
    assert xfer.is_dir() and not xfer.is_symlink() and list(xfer.iterdir()) == []


def _step(xfer: Path, tmp: Path, verb: str, matched: str) -> subprocess.CompletedProcess[str]:
    """The action step as the composite action runs it, in a child with 1 GiB of address
    space (a read without a bound of /dev/zero once took 915 MB and a MemoryError)."""
    env = {**os.environ, "INCSTORE_XFER": str(xfer), "INCSTORE_CACHE": str(tmp / "cache"),
           "INCSTORE_STATE": str(tmp / "state"), "INCSTORE_PREFIX": str(tmp / "target"),
           "INCSTORE_NAME": "w", "INCSTORE_MATCHED_KEY": matched,
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
    i = key("i", 1)
    for verb in ("restore-plan", "restore"):
        if not os.path.lexists(xfer / i / "index.json"):
            _plant_special(xfer / i / "index.json", kind)
        started = time.monotonic()
        p = _step(xfer, tmp_path, verb, i)
        assert time.monotonic() - started < 30
        assert p.returncode == 0, p.stdout + p.stderr
        assert "internal error" not in p.stdout and "Traceback" not in p.stderr
        assert "the cache index is not usable" in p.stdout, p.stdout
        if verb == "restore":  # the refused index cost a cache miss, nothing more
            assert "hit=false" in (tmp_path / "out").read_text()


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
                         "manifests/pending/p", "quarantine/q", ".tmp-incstore-1-x",
                         "record.json", "index.json"])
KINDS = st.sampled_from(["file", "dir", "symlink-outside", "symlink-dir-outside",
                         "symlink-dev-zero", "fifo", "big-sparse"])
KEYS = [key("c", n) for n in range(3)]


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


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "120")), deadline=None,
          derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(KINDS, st.just("record")),
                                  st.lists(NAMES, max_size=5), st.lists(NAMES, max_size=3),
                                  st.lists(st.sampled_from(KEYS), max_size=2)), max_size=4),
       blobs=st.lists(st.tuples(st.sampled_from(KEYS), NAMES, KINDS), max_size=8),
       cache_tree=st.lists(st.tuples(NAMES, KINDS), max_size=4),
       chain=st.lists(st.sampled_from(KEYS), max_size=3, unique=True))
def test_fuzz_merge(tmp_path_factory: pytest.TempPathFactory,
                    entries: list[tuple[str, str, list[str], list[str], list[str]]],
                    blobs: list[tuple[str, str, str]], cache_tree: list[tuple[str, str]],
                    chain: list[str]) -> None:
    """Any mess in the transfer directory and the chunk store: the merge returns within a
    second with problems, never an exception; nothing outside changes; the chunk store
    gains only regular files, from inside the transfer directory; the transfer directory
    ends empty."""
    tmp = tmp_path_factory.mktemp("fuzz")
    xfer, cache = tmp / "xfer", tmp / "cache"
    outside = make_outside(tmp / "outside")
    (outside / "manifests").mkdir()
    (outside / "manifests" / "secret.json").write_text("secret")
    for k, kind, files, deleted, parents in entries:
        if kind == "record" and not os.path.lexists(xfer / k / "record.json"):
            put_content(xfer, k, {}, [n for n in deleted if transfer.travels(n)], parents,
                        files=sorted({n for n in files if transfer.travels(n)}))
        else:
            _plant(xfer, f"{k}/record.json", kind, outside)
    for k, name, kind in blobs:
        _plant(xfer, f"{k}/{name}", kind, outside)
    for name, kind in cache_tree:
        _plant(cache, name, kind, outside)
    xfer.mkdir(exist_ok=True)
    before = snapshot(outside)
    cache_before = {p: p.lstat().st_ino for p in cache.rglob("*")} if cache.exists() else {}
    started = time.monotonic()
    with deadline(10):
        merged = merge_chain(xfer, cache, chain)
    assert time.monotonic() - started < 5
    assert snapshot(outside) == before
    assert set(merged.applied) | set(merged.missing) == set(chain)
    for p in cache.rglob("*"):
        st_ = p.lstat()
        if cache_before.get(p) != st_.st_ino:  # what the merge brought or replaced
            assert stat.S_ISREG(st_.st_mode) or stat.S_ISDIR(st_.st_mode), p
            if stat.S_ISREG(st_.st_mode):
                assert st_.st_size < 1 << 20 and p.read_bytes().startswith(b"blob "), p
    assert xfer.is_dir() and list(xfer.iterdir()) == []
