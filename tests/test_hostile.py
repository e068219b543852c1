"""Hostile chunk stores and target stores (issue 10), case by case, through the real CLI.

Each test plants one thing a writer of the chunk store, or a crash or another process in the
target store, could leave, runs `incstore` as a separate process (with a timeout, so a hang is a
failure) and checks what the issue asks:

- bounded work: a decompression bomb is not written out, a chunk's huge tail is not read, peak
  memory (VmHWM of the child) does not follow the size of what is decompressed;
- nothing outside: a sentinel directory outside the target (the target of every planted
  symlink) is byte-for-byte and mode-for-mode unchanged, and nothing hangs;
- fail before touching the store, and nothing half-registered: every registered path exists and
  hashes right, and no manifest item that is not registered sits under its final store name;
- save must not reuse a bad chunk;
- one line, right code: exactly one `incstore: error:` line (plus per-item `error:` lines), the
  exit code of the README table, never a traceback or an "internal error".

Cases that need what the kernel may refuse (chattr +i, mknod) try and skip with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from array import array
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import xxhash
import zstandard

from incstore import db, nar
from incstore.errors import (
    ChunkCorruptError,
    ChunkMissingError,
    ChunkStoreError,
    DatabaseError,
    IncstoreError,
    LockedError,
    ManifestError,
    NarFormatError,
    StoreError,
)
from incstore.manifest import ChunkRef, Item, Manifest
from incstore.restore import _closure, _topological, execute_restore, plan_restore
from incstore.store import Store
from incstore.storedir import StoreDir
from incstore.storepath import nix32_encode

from .conftest import ROOT, SampleStore, make_sample
from .manifests import dump, load
from .test_errors import referenced_item, with_referrers
from .test_nar import archive, directory, regular, s, toks

MiB = 1 << 20
GiB = 1 << 30
TIMEOUT = 30.0  # seconds any one CLI run may take before it counts as a hang

# --- running the CLI, measured ----------------------------------------------------------------

# Every run is a separate process running the real CLI (`incstore.cli.main`, what
# `python -m incstore` runs), forked from a "zygote" that has imported it once: a fresh
# interpreter would spend ~0.3 s of CPU on imports per run, and this module makes ~100 runs.
# The forked child starts from the zygote's state right after `import incstore.cli` (as a new
# interpreter would be), with its own argv, environment, standard streams and descriptor limit,
# and reports at exit its own peak RSS (VmHWM, which starts at the zygote's ~30 MB, like a
# fresh interpreter's) and the bytes it read and wrote (rchar and wchar, counted from the fork).
_ZYGOTE = r"""
import json, os, resource, sys, traceback
import incstore.cli

def report(path):
    status = open("/proc/self/status").read().splitlines()
    hwm = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
    io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
    with open(path, "w") as f:
        f.write(f"{hwm} {io['rchar']} {io['wchar']}")

def child(req):
    for fd, path in ((1, req["stdout"]), (2, req["stderr"]), (0, os.devnull)):
        new = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC if fd else os.O_RDONLY, 0o600)
        os.dup2(new, fd)
        os.close(new)
    if req["nofile"]:
        resource.setrlimit(resource.RLIMIT_NOFILE, (req["nofile"], req["nofile"]))
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    sys.argv = ["incstore", *req["args"]]
    code = 0
    try:
        incstore.cli.main()
    except SystemExit as e:  # as the interpreter turns it into an exit status
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    report(req["report"])
    os._exit(code)

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(req)
        finally:
            os._exit(70)
    print(json.dumps({"pid": pid}), flush=True)
    print(json.dumps({"status": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
"""


class Zygote:
    """The process the CLI runs are forked from (see above); requests and replies are lines."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=ROOT)
        self.pending = b""

    def _reply(self, deadline: float | None) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the CLI zygote died")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def run(self, request: dict[str, Any], timeout: float) -> int | None:
        """The exit status of one run, or None if it was killed for outliving `timeout`."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        started = self._reply(None)
        assert started is not None
        done = self._reply(time.monotonic() + timeout)
        if done is None:
            os.kill(started["pid"], signal.SIGKILL)  # the run we started, by its pid
            self._reply(None)
            return None
        return int(done["status"])

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


_zygote: Zygote | None = None


@pytest.fixture(scope="module", autouse=True)
def zygote() -> Iterator[None]:
    global _zygote
    _zygote = Zygote()
    try:
        yield
    finally:
        _zygote.stop()
        _zygote = None


@dataclass
class Run:
    """One CLI run: exit code, output, and what the process used."""

    code: int
    out: str
    err: str
    seconds: float
    peak_mb: float = 0.0  # VmHWM
    read_mb: float = 0.0  # rchar: every byte read() returned, files and pipes
    written_mb: float = 0.0  # wchar

    @property
    def final_errors(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("incstore: error:")]

    @property
    def item_errors(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("error:")]

    @property
    def warnings(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("warning:")]


def cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = TIMEOUT,
        nofile: int | None = None) -> Run:
    """Run the real CLI in a child process (with RLIMIT_NOFILE `nofile`, soft and hard, if
    given); a run that outlives `timeout` is killed and fails the test."""
    assert _zygote is not None
    with tempfile.TemporaryDirectory(prefix="incstore-run-") as tmp:
        files = {name: os.path.join(tmp, name) for name in ("stdout", "stderr", "report")}
        request = {"args": [str(a) for a in args], "env": {**os.environ, **(env or {})},
                   "cwd": os.getcwd(), "nofile": nofile, **files}
        start = time.monotonic()
        status = _zygote.run(request, timeout)
        if status is None:
            pytest.fail(f"incstore {args[0]} hung: no exit within {timeout} s")
        run = Run(status, Path(files["stdout"]).read_text(errors="replace"),
                  Path(files["stderr"]).read_text(errors="replace"), time.monotonic() - start)
        if os.path.exists(files["report"]):
            hwm, rchar, wchar = (int(f) for f in Path(files["report"]).read_text().split())
            run.peak_mb, run.read_mb, run.written_mb = hwm / 1024, rchar / MiB, wchar / MiB
    # the CLI's output as a terminal-less run shows it (a carriage return starts error lines)
    run.err = run.err.replace("\r", "\n")
    return run


def assert_one_line(r: Run) -> None:
    """No traceback, no internal error, and stderr made only of the lines the CLI prints."""
    assert "Traceback" not in r.err, r.err
    assert "internal error" not in r.err, r.err
    for line in r.err.splitlines():
        assert line == "" or line.startswith(("error: ", "warning: ", "incstore: error: ")), \
            f"unexpected stderr line {line!r}"


def assert_fails(r: Run, code: int | tuple[int, ...], *, naming: str | None = None) -> None:
    """Exit `code` (or one of them) with exactly one final error line, naming `naming`."""
    codes = code if isinstance(code, tuple) else (code,)
    assert r.code in codes, (r.code, r.err)
    assert_one_line(r)
    assert len(r.final_errors) == 1, r.err
    if naming is not None:
        assert naming in r.err, r.err


def assert_ok(r: Run) -> None:
    assert r.code == 0, r.err
    assert_one_line(r)
    assert not r.final_errors


# --- what must not change ----------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything under `root`, never following a symlink: type, mode, size, mtime, content."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ["."]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            body: Any = None
            if stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            out[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                st.st_size, st.st_mtime_ns, st.st_uid, body)
    return out


def make_outside(path: Path) -> Path:
    """A directory outside every store and chunk store, for planted symlinks to point into."""
    (path / "sub").mkdir(parents=True)
    (path / "precious").write_bytes(b"must stay as it is\n")
    (path / "secret").write_bytes(b"0600 and must stay so\n")
    (path / "secret").chmod(0o600)
    (path / "sub" / "deep").write_bytes(b"x" * 100)
    (path / "sub").chmod(0o750)
    os.symlink("precious", path / "link")
    return path


def make_db(db_path: Path, infos: list[db.PathInfo] | None = None) -> None:
    """A fresh Guix daemon DB (and its directory) holding `infos`."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db.create(db_path, db.GUIX, infos or [])


def registered(db_path: Path) -> dict[str, str]:
    if not db_path.exists():
        return {}
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("select path, hash from ValidPaths"))
    finally:
        conn.close()


def assert_store_consistent(prefix: Path, paths: list[str], *, debris: Collection[str] = (),
                            temps_ok: bool = False) -> dict[str, str]:
    """Nothing half-registered: every registered path exists and hashes right; no item of
    `paths` that is not registered sits under its final name (unless planted as `debris`);
    no temporary entry is left. Returns the registered paths."""
    store = Store(prefix, db.GUIX)
    valid = registered(store.default_db)
    for path, nar_hash in valid.items():
        physical = store.physical(path)
        assert os.path.lexists(physical), f"{path}: registered but missing"
        assert nar.dump_hashed(physical).db_hash == nar_hash, f"{path}: registered, hash differs"
    for path in paths:
        if path not in valid and path not in debris:
            assert not os.path.lexists(store.physical(path)), f"{path}: on disk, not registered"
    if store.store_root.is_dir() and not temps_ok:
        left = [n for n in os.listdir(store.store_root) if n.startswith(".incstore-tmp-")]
        assert not left, left
    return valid


# --- worlds: a saved sample store and a fresh target ------------------------------------------


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> tuple[SampleStore, Path, Path]:
    """A 16-item sample store saved once per module: (store, cache, manifest)."""
    base = tmp_path_factory.mktemp("golden")
    src = make_sample(base / "src", items=16, seed=10)
    cache, manifest = base / "cache", base / "m.json"
    r = cli("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
            "--manifest", manifest)
    assert r.code == 0, r.err
    return src, cache, manifest


@dataclass
class World:
    """A copy of the golden chunk store and manifest, an empty target, and a sentinel."""

    src: SampleStore
    cache: Path
    manifest: Path
    dst: Path
    outside: Path
    before: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def doc(self) -> dict[str, Any]:
        return load(self.manifest)

    @property
    def paths(self) -> list[str]:
        return [i["path"] for i in self.doc["items"]]

    @property
    def store(self) -> Path:
        return self.dst / "gnu" / "store"

    @property
    def db_path(self) -> Path:
        return Store(self.dst, db.GUIX).default_db

    def chunk(self, item: dict[str, Any]) -> Path:
        return self.cache / "nar" / f"{item['chunk']['key']}.nar.zst"

    def nar_of(self, item: dict[str, Any]) -> bytes:
        return zstandard.ZstdDecompressor().decompressobj().decompress(
            self.chunk(item).read_bytes())

    def put_chunk(self, item: dict[str, Any], data: bytes, *, follow: bool = True) -> None:
        """Replace an item's chunk; with `follow`, the manifest records the new chunk's size
        and xxh3 (so only the checks past those can catch it)."""
        doc = self.doc
        entry = next(i for i in doc["items"] if i["path"] == item["path"])
        chunk = self.chunk(entry)
        with contextlib.suppress(FileNotFoundError):
            chunk.unlink()
        chunk.write_bytes(data)
        if follow:
            entry["chunk"]["size"] = len(data)
            entry["chunk"]["xxh3_128"] = xxhash.xxh3_128(data).hexdigest()
            dump(self.manifest, doc)

    def restore(self, *extra: str | Path, **kw: Any) -> Run:
        return cli("restore", "--manifest", self.manifest, "--cache", self.cache,
                   "--prefix", self.dst, *extra, **kw)

    def save(self, *extra: str | Path, **kw: Any) -> Run:
        return cli("save", "--db", self.src.db_path, "--prefix", self.src.prefix,
                   "--cache", self.cache, "--manifest", self.manifest, *extra, **kw)

    def untouched_outside(self) -> None:
        assert snapshot(self.outside) == self.before, "something outside the target changed"

    def consistent(self, **kw: Any) -> dict[str, str]:
        return assert_store_consistent(self.dst, self.paths, **kw)


@pytest.fixture
def world(tmp_path: Path, golden: tuple[SampleStore, Path, Path]) -> Iterator[World]:
    """A fresh world; after the test, whatever it did, the sentinel outside is checked."""
    src, cache, manifest = golden
    w = World(src, tmp_path / "cache", tmp_path / "m.json", tmp_path / "dst",
              make_outside(tmp_path / "outside"))
    shutil.copytree(cache, w.cache)
    shutil.copy(manifest, w.manifest)
    w.before = snapshot(w.outside)
    yield w
    w.untouched_outside()


def compress(data: bytes, **kw: Any) -> bytes:
    """One zstd frame with the content checksum, no content size (like incstore's chunks)."""
    return zstandard.ZstdCompressor(write_checksum=True, write_content_size=False,
                                    **kw).compress(data)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A well-formed NAR of a directory holding 1,024 files of 1 MiB of zeros: 1 GiB of NAR in
    a ~140 KB chunk. Every file fits the limit on its own; only the total gives it away."""
    c = zstandard.ZstdCompressor(level=1, write_checksum=True,
                                 write_content_size=False).compressobj()
    out = [c.compress(s(b"nix-archive-1") + toks(b"(", b"type", b"directory"))]
    zeros = bytes(MiB)
    for n in range(1024):
        out.append(c.compress(toks(b"entry", b"(", b"name", b"f%04d" % n, b"node", b"(",
                                   b"type", b"regular", b"contents") + MiB.to_bytes(8, "little")))
        out.append(c.compress(zeros))
        out.append(c.compress(toks(b")", b")")))
    out += [c.compress(toks(b")")), c.flush()]
    return b"".join(out)


def big_item_chunk(nar_bytes: int, *, window_log: int | None = None) -> tuple[bytes, str, int]:
    """A chunk holding a NAR of one regular file of zeros, `nar_bytes` long in all: (chunk,
    `sha256:` NAR hash, NAR size). A given `window_log` makes the frame ask for that window."""
    head = s(b"nix-archive-1") + toks(b"(", b"type", b"regular", b"contents")
    tail = toks(b")")
    content = nar_bytes - len(head) - 8 - len(tail)
    assert content % 8 == 0
    if window_log is None:
        params = zstandard.ZstdCompressionParameters.from_level(
            1, write_checksum=True, write_content_size=False)
    else:
        params = zstandard.ZstdCompressionParameters.from_level(
            1, window_log=window_log, write_checksum=True, write_content_size=False)
    c = zstandard.ZstdCompressor(compression_params=params).compressobj()
    sha = hashlib.sha256()
    out = []
    for piece in (head, content.to_bytes(8, "little")):
        out.append(c.compress(piece))
        sha.update(piece)
    zeros = bytes(16 * MiB)
    left = content
    while left:
        block = zeros[: min(left, len(zeros))]
        out.append(c.compress(block))
        sha.update(block)
        left -= len(block)
    out += [c.compress(tail), c.flush()]
    sha.update(tail)
    return b"".join(out), "sha256:" + sha.hexdigest(), nar_bytes


# === bounded work ==============================================================================


def test_zstd_bomb_is_stopped_at_the_items_nar_size(world: World, bomb: bytes) -> None:
    item = referenced_item(world.doc)
    world.put_chunk(item, bomb)
    r = world.restore()
    assert_fails(r, (ChunkCorruptError.exit_code, NarFormatError.exit_code), naming=item["path"])
    assert r.written_mb < 32, f"wrote {r.written_mb:.0f} MiB of a 1 GiB bomb"
    assert r.peak_mb < 100, f"peak RSS {r.peak_mb:.0f} MB"
    assert r.seconds < 10
    assert list((world.cache / "quarantine").iterdir()), "the bomb was not quarantined"
    world.consistent()
    world.untouched_outside()


def test_zstd_bomb_exit_code_is_a_size_mismatch(world: World, bomb: bytes) -> None:
    item = referenced_item(world.doc)
    world.put_chunk(item, bomb)
    checked = cli("check", "--full", "--cache", world.cache, "--manifest", world.manifest)
    assert checked.code == ChunkCorruptError.exit_code
    assert world.restore().code == ChunkCorruptError.exit_code


def add_huge_tail(chunk: Path, size: int) -> None:
    """Append a zstd skippable frame of `size` bytes (sparse: free until read), so that a
    decompressor does not stop at it and only a reader that counts bytes does."""
    with open(chunk, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(struct.pack("<II", 0x184D2A50, min(size, 0xFFFFFFFF)))
        f.truncate(f.tell() + size)


def test_chunk_with_a_huge_tail_is_not_read_to_its_end(world: World) -> None:
    item = referenced_item(world.doc)
    add_huge_tail(world.chunk(item), 64 * GiB)
    r = world.restore()
    assert_fails(r, ChunkCorruptError.exit_code, naming=item["path"])
    assert r.read_mb < 64, f"read {r.read_mb:.0f} MiB of a chunk recorded as a few KB"
    world.consistent()


@pytest.mark.parametrize("command", ["check", "check-full", "save"])
def test_other_readers_stop_at_the_recorded_size(world: World, command: str) -> None:
    item = referenced_item(world.doc)
    add_huge_tail(world.chunk(item), 128 * MiB)
    if command == "save":
        r = world.save()
    else:
        r = cli("check", *(["--full"] if command == "check-full" else []),
                "--cache", world.cache, "--manifest", world.manifest)
    assert r.read_mb < 64, f"{command} read {r.read_mb:.0f} MiB"


def test_save_does_not_adopt_a_chunk_with_a_tail(world: World) -> None:
    item = referenced_item(world.doc)
    add_huge_tail(world.chunk(item), 128 * MiB)
    assert_ok(world.save())
    entry = next(i for i in world.doc["items"] if i["path"] == item["path"])
    size = entry["chunk"]["size"]
    assert size < MiB, f"the manifest records a {size}-byte chunk"


def test_check_full_memory_does_not_follow_item_size(world: World) -> None:
    """A (claimed) 256 MiB item: check --full streams it in bounded memory."""
    item = world.doc["items"][0]
    chunk, nar_hash, nar_size = big_item_chunk(256 * MiB)
    doc = world.doc
    entry = doc["items"][0]
    entry["nar_hash"], entry["nar_size"] = nar_hash, nar_size
    dump(world.manifest, doc)
    world.put_chunk(item, chunk)
    r = cli("check", "--full", "--cache", world.cache, "--manifest", world.manifest)
    assert_ok(r)
    assert r.peak_mb < 100, f"peak RSS {r.peak_mb:.0f} MB for a 256 MiB item"


def test_check_full_stops_a_bomb_early(world: World, bomb: bytes) -> None:
    item = referenced_item(world.doc)
    world.put_chunk(item, bomb)
    r = cli("check", "--full", "--cache", world.cache, "--manifest", world.manifest)
    assert r.code == ChunkCorruptError.exit_code, r.err
    assert_one_line(r)
    assert r.peak_mb < 100 and r.seconds < 10


def test_check_full_memory_with_large_windows_and_workers(world: World) -> None:
    doc = world.doc
    chunk, nar_hash, nar_size = big_item_chunk(160 * MiB, window_log=27)
    for entry in doc["items"][:4]:
        entry["nar_hash"], entry["nar_size"] = nar_hash, nar_size
        entry["chunk"]["size"] = len(chunk)
        entry["chunk"]["xxh3_128"] = xxhash.xxh3_128(chunk).hexdigest()
        world.chunk(entry).unlink()
        world.chunk(entry).write_bytes(chunk)
    dump(world.manifest, doc)
    r = cli("check", "--full", "--jobs", "4", "--cache", world.cache, "--manifest",
            world.manifest)
    # a frame that asks for a window beyond the decoder's cap is refused (incstore writes at
    # most level 19, an 8 MiB window), so memory does not grow with what a chunk asks for
    assert r.code == ChunkCorruptError.exit_code, r.err
    assert "window" in r.out
    assert r.peak_mb < 200, f"peak RSS {r.peak_mb:.0f} MB"


def test_save_checks_an_existing_chunk_in_bounded_memory(world: World, bomb: bytes) -> None:
    """A chunk without narinfo is found on write (create-only link fails) and inspected: a bomb
    there is stopped at the item's NAR size, quarantined, and the item written again."""
    item = referenced_item(world.doc)
    key = item["chunk"]["key"]
    (world.cache / f"{key}.narinfo").unlink()
    world.put_chunk(item, bomb, follow=False)
    r = world.save()
    assert_ok(r)
    assert r.peak_mb < 100, f"peak RSS {r.peak_mb:.0f} MB"
    assert r.written_mb < 64
    assert list((world.cache / "quarantine").iterdir())
    assert_ok(cli("check", "--full", "--cache", world.cache, "--manifest", world.manifest))
    assert_ok(world.restore())
    assert set(world.consistent()) == set(world.paths)


def _chain_manifest(n: int) -> Manifest:
    """n items, each referencing itself and the next one: a reference chain."""
    paths = sorted(f"/gnu/store/{nix32_encode(hashlib.sha1(b'%d' % i).digest())}-c{i}"
                   for i in range(n))
    items = [Item(db.PathInfo(p, "sha256:" + "0" * 64, 1, 1,
                              references=tuple(sorted({p, paths[min(k + 1, n - 1)]}))),
                  ChunkRef(p[11:43], 1, "0" * 32)) for k, p in enumerate(paths)]
    return Manifest.from_items(db.GUIX, items)


def test_closure_filter_is_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8,000-item chain whose last item failed once took 9.5 s: the closure filter and the
    ordering must look at each item's references a bounded number of times, however long the
    chain (counted, not timed)."""
    from incstore import restore

    for n in (8_000, 24_000):
        m = _chain_manifest(n)
        looks = 0
        real = Manifest.ref_indices

        def counted(self: Manifest, k: int, real: Any = real) -> Any:
            nonlocal looks
            looks += 1
            return real(self, k)

        monkeypatch.setattr(Manifest, "ref_indices", counted)
        ok = bytearray(b"\x01" * n)
        ok[n - 1] = 0
        referrers = restore._Referrers(m)
        usable = _closure(m, ok, set(), referrers)
        order, cyclic = _topological(m, array("l", range(n)), referrers)
        monkeypatch.undo()
        assert not any(usable)
        assert order[0] == n - 1 and not cyclic and len(order) == n
        assert looks <= 4 * n, f"{n} items: {looks} looks at reference lists"


# === tiny stores: thousands of single-file items --------------------------------------------


TINY_ITEMS = 1200  # more than twice the descriptor limit below
FD_LIMIT = 512


@dataclass
class Tiny:
    cache: Path
    manifest: Path
    paths: list[str]  # in chain order: paths[k] references paths[k + 1]


def build_tiny(root: Path, n: int) -> Tiny:
    """A chunk store and manifest of `n` single-file items forming one reference chain (item k
    references itself and item k+1), written directly (no source store, no narinfos: restore
    reads neither)."""
    cache = root / "cache"
    (cache / "nar").mkdir(parents=True)
    (cache / "nix-cache-info").write_text("StoreDir: /gnu/store\nWantMassQuery: 1\nPriority: 40\n")
    paths = [f"/gnu/store/{nix32_encode(hashlib.sha1(b'tiny%d' % k).digest())}-t{k}"
             for k in range(n)]
    cctx = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
    items = []
    for k, path in enumerate(paths):
        refs = tuple(sorted({path, paths[min(k + 1, n - 1)]}))
        data = archive(regular(("\n".join(refs) + "\n").encode(), executable=k % 2 == 1))
        chunk = cctx.compress(data)
        key = path[11:43]
        (cache / "nar" / f"{key}.nar.zst").write_bytes(chunk)
        info = db.PathInfo(path, "sha256:" + hashlib.sha256(data).hexdigest(), len(data),
                           1700000000, references=refs)
        items.append(Item(info, ChunkRef(key, len(chunk), xxhash.xxh3_128(chunk).hexdigest())))
    manifest = root / "tiny.json"
    Manifest.from_items(db.GUIX, items, created="2024-01-01T00:00:00Z").write(manifest)
    return Tiny(cache, manifest, paths)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("tiny"), TINY_ITEMS)


def test_nar_of_tiny_items_matches_dump(tmp_path: Path) -> None:
    """The tiny builder's in-memory NARs are what `nar.dump_hashed` gives for the file."""
    f = tmp_path / "f"
    f.write_bytes(b"abc\n")
    f.chmod(0o555)
    data = archive(regular(b"abc\n", executable=True))
    assert nar.dump_hashed(f) == nar.NarDigest(hashlib.sha256(data).hexdigest(), len(data))


def test_out_of_file_descriptors(tmp_path: Path, tiny: Tiny) -> None:
    """More items to restore than descriptors (3,000 under the usual 1,024 left 1,016 items
    extracted and unregistered; here 1,200 under 512, soft and hard): batches fit the limit,
    and the restore completes, or fails in one line with nothing left half-done."""

    dst = tmp_path / "dst"
    r = cli("restore", "--manifest", tiny.manifest, "--cache", tiny.cache, "--prefix", dst,
            "--jobs", "2", nofile=FD_LIMIT, timeout=60)
    assert_one_line(r)
    if r.code != 0:
        assert len(r.final_errors) == 1 and r.code != 1, r.err
    valid = assert_store_consistent(dst, tiny.paths)
    if r.code == 0:
        assert len(valid) == TINY_ITEMS


def test_chain_whose_last_item_fails(tmp_path: Path, tiny: Tiny) -> None:
    """Hundreds of items that all depend on the last one, which fails: nothing is registered,
    nothing is left under a final name, and the run stays quick."""
    doc = load(tiny.manifest)
    half = set(tiny.paths[TINY_ITEMS // 2:])  # closed: item k references only k and k + 1
    doc["items"] = [i for i in doc["items"] if i["path"] in half]
    last = next(i for i in doc["items"] if i["path"] == tiny.paths[-1])
    last["chunk"]["xxh3_128"] = "f" * 32  # fails its chunk check (not quarantined: shared)
    manifest = tmp_path / "m.json"
    dump(manifest, doc)
    dst = tmp_path / "dst"
    r = cli("restore", "--manifest", manifest, "--cache", tiny.cache, "--prefix", dst)
    assert_fails(r, ChunkCorruptError.exit_code, naming=tiny.paths[-1])
    assert r.seconds < 20
    assert assert_store_consistent(dst, sorted(half)) == {}


def test_final_error_line_is_bounded(tmp_path: Path, tiny: Tiny) -> None:
    cache = tmp_path / "cache"
    (cache / "nar").mkdir(parents=True)
    shutil.copy(tiny.cache / "nix-cache-info", cache)
    r = cli("restore", "--manifest", tiny.manifest, "--cache", cache, "--prefix",
            tmp_path / "dst")
    assert_fails(r, ChunkMissingError.exit_code)
    assert len(r.final_errors[0]) < 4096, f"final line is {len(r.final_errors[0])} chars"


# === no file outside the store, no hang ========================================================


@pytest.mark.parametrize("where", ["item-existing-file", "item-dangling", "gc.lock", "big-lock"])
def test_lock_symlink_is_refused(world: World, where: str) -> None:
    item = world.doc["items"][3]
    world.store.mkdir(parents=True)
    (world.dst / "var/guix/db").mkdir(parents=True)
    lock = {"item-existing-file": world.store / (item["path"][11:] + ".lock"),
            "item-dangling": world.store / (item["path"][11:] + ".lock"),
            "gc.lock": world.dst / "var/guix/gc.lock",
            "big-lock": world.dst / "var/guix/db/big-lock"}[where]
    os.symlink(world.outside / ("precious" if where == "item-existing-file" else "created"),
               lock)
    # item locks are taken where another writer may run: in place (a swap excludes them all)
    r = world.restore(*(["--db-mode", "in-place"] if where.startswith("item") else []))
    assert_fails(r, StoreError.exit_code, naming="symbolic link")
    world.untouched_outside()
    assert lock.is_symlink()
    valid = world.consistent()
    if where.startswith("item"):
        assert item["path"] not in valid
        assert set(valid) == set(world.paths) - with_referrers(world.doc, item["path"])
    else:  # refused before anything was extracted
        assert valid == {} and not [p for p in world.store.iterdir()]


@pytest.mark.parametrize(("where", "kind"), [("item", "fifo"), ("item", "dir"),
                                             ("gc.lock", "fifo"), ("big-lock", "fifo")])
def test_lock_that_is_not_a_file_does_not_hang(world: World, where: str, kind: str) -> None:
    item = world.doc["items"][3]
    world.store.mkdir(parents=True)
    (world.dst / "var/guix/db").mkdir(parents=True)
    lock = {"item": world.store / (item["path"][11:] + ".lock"),
            "gc.lock": world.dst / "var/guix/gc.lock",
            "big-lock": world.dst / "var/guix/db/big-lock"}[where]
    os.mkfifo(lock) if kind == "fifo" else lock.mkdir()
    r = world.restore(*(["--db-mode", "in-place"] if where == "item" else []), timeout=20)
    assert_fails(r, StoreError.exit_code)
    world.consistent()
    world.untouched_outside()


def test_a_swap_takes_no_item_locks_and_never_opens_a_planted_one(world: World) -> None:
    """A swap holds big-lock exclusively, so no other writer can run: it makes no `.lock`
    file per item, and one planted at an item's lock name (a symlink outside, a FIFO) is not
    opened."""
    items = world.doc["items"]
    world.store.mkdir(parents=True)
    os.symlink(world.outside / "precious", world.store / (items[3]["path"][11:] + ".lock"))
    os.mkfifo(world.store / (items[4]["path"][11:] + ".lock"))
    r = world.restore("--db-mode", "swap", timeout=20)
    assert_ok(r)
    assert set(world.consistent()) == set(world.paths)
    world.untouched_outside()


def test_lock_file_holding_data_does_not_spin(world: World) -> None:
    item = world.doc["items"][3]
    world.store.mkdir(parents=True)
    lock = world.store / (item["path"][11:] + ".lock")
    lock.write_bytes(b"planted data")
    r = world.restore(timeout=20)
    assert_ok(r)
    assert set(world.consistent()) == set(world.paths)
    assert not lock.exists()


def test_items_one_named_as_the_others_lock_are_refused(world: World) -> None:
    doc = world.doc
    item = doc["items"][3]
    twin = {**item, "path": item["path"] + ".lock", "references": []}
    doc["items"].insert(4, twin)
    dump(world.manifest, doc)
    r = world.restore()
    assert_fails(r, ManifestError.exit_code)
    assert not world.dst.exists()


def test_registered_item_named_like_a_lock_is_not_clobbered(world: World) -> None:
    """The target store holds a valid item `X.lock` (a single file) and the manifest restores
    `X`: taking X's lock must neither delete nor write into the valid item `X.lock`, in the
    run that extracts X nor in a later run that finds X present."""
    item = world.doc["items"][3]
    world.store.mkdir(parents=True)
    twin = world.store / (item["path"][11:] + ".lock")
    twin.write_bytes(b"a valid store item\n")
    twin.chmod(0o444)
    os.utime(twin, (1, 1))
    digest = nar.dump_hashed(twin)
    twin_path = "/gnu/store/" + twin.name
    make_db(world.db_path, [db.PathInfo(twin_path, digest.db_hash, digest.size, 1700000000)])
    for _ in range(2):
        r = world.restore(timeout=20)
        assert_one_line(r)
        assert r.code in (0, StoreError.exit_code), r.err
        assert twin.exists() and nar.dump_hashed(twin) == digest, "the valid item was clobbered"
        assert twin_path in world.consistent()


def test_removal_never_follows_a_swapped_in_symlink(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that can write inside debris swaps a directory for a symlink to outside
    between the listing and the descent: removal unlinks the symlink and chmods or deletes
    nothing outside."""
    outside = make_outside(tmp_path / "outside")
    before = snapshot(outside)
    store = tmp_path / "store"
    debris = store / "debris"
    (debris / "a" / "b").mkdir(parents=True)
    (debris / "a" / "b" / "f").write_text("x")
    (debris / "file").write_text("x")
    for d in (debris / "a" / "b", debris / "a", debris):
        d.chmod(0o555)
    real_clear = StoreDir._clear_files
    swapped: list[str] = []

    def clear_then_swap(self: StoreDir, fd: int, report: Any) -> list[str]:
        subdirs = real_clear(self, fd, report)
        if "a" in subdirs and not swapped:  # the attacker strikes after the listing
            os.rename("a", "a-moved", src_dir_fd=fd, dst_dir_fd=fd)
            os.symlink(str(outside), "a", dir_fd=fd)
            swapped.append("a")
        return subdirs

    monkeypatch.setattr(StoreDir, "_clear_files", clear_then_swap)
    with StoreDir(store) as sd:
        report = sd.remove("debris")
    assert swapped
    assert snapshot(outside) == before
    assert not os.path.lexists(debris / "a")  # the symlink itself went
    assert report.failures, "a-moved was never listed, so the top cannot be empty"
    # the entry swapped for a symlink just before the top is opened
    (store / "other").mkdir()
    with StoreDir(store) as sd:
        os.rmdir(store / "other")
        os.symlink(str(outside), store / "other")
        assert not sd.remove("other").failures
    assert snapshot(outside) == before and (outside / "precious").exists()


def test_debris_with_symlinks_and_locked_dirs_is_replaced(world: World) -> None:
    item = world.doc["items"][3]
    world.store.mkdir(parents=True)
    debris = world.store / item["path"][11:]
    (debris / "locked").mkdir(parents=True)
    os.symlink(str(world.outside), debris / "to-outside")
    os.symlink(str(world.outside / "precious"), debris / "locked" / "file-link")
    os.mkfifo(debris / "fifo")
    (debris / "locked").chmod(0)
    debris.chmod(0o555)
    r = world.restore()
    assert_ok(r)
    assert set(world.consistent()) == set(world.paths)
    world.untouched_outside()


def _deep_tree(parent: Path, name: str, levels: int, segment: str) -> None:
    """A directory chain `levels` deep (a file and a 0555 directory at each level), made
    through descriptors: the whole path is far longer than PATH_MAX."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir(name, dir_fd=fd)
    for step in [name] + [segment] * levels:
        if step is not name:
            os.mkdir(step, dir_fd=fd)
        child = os.open(step, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
        os.close(os.open("file", os.O_WRONLY | os.O_CREAT, 0o444, dir_fd=fd))
    os.close(fd)
    # read-only from the top down, as a store tree (through fds again)
    fd = os.open(parent / name, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        child = os.open(segment, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.fchmod(fd, 0o555)
        os.close(fd)
        fd = child
    os.fchmod(fd, 0o555)
    os.close(fd)


@pytest.mark.parametrize("case", ["debris-1200-deep", "stale-temp-1200-deep",
                                  "stale-temp-100-long-names"])
def test_deep_trees_are_removed(world: World, case: str) -> None:
    world.store.mkdir(parents=True)
    item = world.doc["items"][3]
    name = item["path"][11:] if case.startswith("debris") else ".incstore-tmp-999999-0-stale"
    if case.endswith("long-names"):
        _deep_tree(world.store, name, 100, "n" * 250)
    else:
        _deep_tree(world.store, name, 1200, "d")
    r = world.restore(timeout=60)
    assert_ok(r)
    assert set(world.consistent()) == set(world.paths)
    assert r.seconds < 20


def _deep_nar(levels: int, segment: bytes) -> bytes:
    node = regular(b"bottom\n")
    for _ in range(levels):
        node = directory((segment, node))
    return archive(node)


@pytest.mark.parametrize("hash_ok", [False, True])
def test_deep_nar_with_long_names(world: World, hash_ok: bool) -> None:
    """A NAR 100 levels of 250-byte names (a 25,000-byte path): when it fails verification its
    temporary tree is removed all the same, and the next restore is not stuck in the sweep."""
    doc = world.doc
    item = next(i for i in doc["items"] if i["path"] not in {
        r for j in doc["items"] for r in j["references"] if r != j["path"]})  # a leaf referrer
    data = _deep_nar(100, b"n" * 250)
    entry = next(i for i in doc["items"] if i["path"] == item["path"])
    entry["nar_size"] = len(data)
    entry["nar_hash"] = "sha256:" + (hashlib.sha256(data).hexdigest() if hash_ok else "0" * 64)
    dump(world.manifest, doc)
    world.put_chunk(entry, compress(data))
    for _ in range(2):
        r = world.restore(timeout=60)
        if hash_ok:
            assert_ok(r)
        else:
            assert_fails(r, ChunkCorruptError.exit_code, naming=item["path"])
        valid = world.consistent()
        assert (item["path"] in valid) == hash_ok
        if not hash_ok:  # quarantined: put it back for the second run
            world.put_chunk(entry, compress(data))


def test_stale_temp_holding_an_immutable_file(world: World) -> None:
    world.store.mkdir(parents=True)
    stale = world.store / ".incstore-tmp-999999-0-stale"
    (stale / "sub").mkdir(parents=True)
    pinned = stale / "sub" / "pinned"
    pinned.write_text("x")
    try:
        done = subprocess.run(["chattr", "+i", str(pinned)], capture_output=True, text=True,
                              check=False)
    except FileNotFoundError:
        pytest.skip("chattr is not installed")
    if done.returncode != 0:
        pytest.skip(f"the kernel refuses chattr +i here: {done.stderr.strip()}")
    try:
        for run in range(2):
            r = world.restore()
            assert_ok(r)
            # the second run has nothing to do, and a run with nothing to do sweeps nothing
            assert any("stale temporary" in w for w in r.warnings) == (run == 0), r.err
            assert set(world.consistent(temps_ok=True)) == set(world.paths)
    finally:
        subprocess.run(["chattr", "-i", str(pinned)], check=False)


def _plant(path: Path, kind: str) -> None:
    """Put a FIFO, directory, character device or symlink to /dev/zero at `path`."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "chardev":
        try:
            os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
        except PermissionError:
            pytest.skip("mknod needs CAP_MKNOD")
    else:
        os.symlink("/dev/zero", path)


KINDS = ["fifo", "dir", "chardev", "zero-link"]


@pytest.mark.parametrize("kind", KINDS)
def test_special_file_at_a_chunk(world: World, kind: str) -> None:
    item = referenced_item(world.doc)
    _plant(world.chunk(item), kind)
    r = world.restore(timeout=20)
    assert_fails(r, (StoreError.exit_code, ChunkStoreError.exit_code))
    assert r.item_errors, r.err
    assert set(world.consistent()) == set(world.paths) - with_referrers(world.doc, item["path"])
    world.untouched_outside()
    if kind == "fifo":
        checked = cli("check", "--full", "--cache", world.cache, "--manifest", world.manifest,
                      timeout=20)
        assert checked.code in (ChunkMissingError.exit_code, ChunkStoreError.exit_code,
                                StoreError.exit_code), checked.err
        assert_one_line(checked)


def test_special_file_at_a_chunk_names_the_item(world: World) -> None:
    item = referenced_item(world.doc)
    _plant(world.chunk(item), "fifo")
    r = world.restore(timeout=20)
    assert item["path"] in r.final_errors[0], r.err


@pytest.mark.parametrize("kind", ["fifo", "dir", "zero-link"])
def test_special_file_at_nix_cache_info(world: World, kind: str) -> None:
    _plant(world.cache / "nix-cache-info", kind)
    r = world.restore(timeout=20)
    assert_fails(r, ChunkStoreError.exit_code, naming="nix-cache-info")
    assert not world.store.exists() or not list(world.store.iterdir())
    world.untouched_outside()


@pytest.mark.parametrize(("kind", "other"), [("fifo", "gc"), ("dir", "stats"),
                                             ("zero-link", "check")])
def test_special_file_at_a_named_manifest(world: World, kind: str, other: str) -> None:
    _plant(world.cache / "manifests" / "main.json", kind)
    r = cli("restore", "--name", "main", "--cache", world.cache, "--prefix", world.dst,
            timeout=20)
    assert_fails(r, (ChunkStoreError.exit_code, ManifestError.exit_code), naming="main")
    assert not world.dst.exists()
    command = [other, "--dry-run"] if other == "gc" else [other]
    also = cli(*command, "--cache", world.cache, timeout=20)
    assert_one_line(also)
    assert also.code in (0, ChunkStoreError.exit_code, ManifestError.exit_code), also.err


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_special_file_at_the_manifest_path(world: World, kind: str) -> None:
    _plant(world.manifest, kind)
    r = world.restore(timeout=20)
    assert_fails(r, ManifestError.exit_code, naming=str(world.manifest))
    assert not world.dst.exists()


def test_fifo_at_a_narinfo_on_save(world: World) -> None:
    item = referenced_item(world.doc)
    _plant(world.cache / f"{item['chunk']['key']}.narinfo", "fifo")
    assert_ok(world.save(timeout=20))


@pytest.mark.parametrize("where", ["narinfo", "chunk"])
def test_save_with_one_unwritable_item_writes_a_closed_manifest(world: World,
                                                                where: str) -> None:
    item = referenced_item(world.doc)
    key = item["chunk"]["key"]
    if where == "narinfo":  # a directory where the narinfo goes: its write fails
        _plant(world.cache / f"{key}.narinfo", "dir")
    else:  # a directory where the chunk goes, and no narinfo: the chunk cannot be written
        (world.cache / f"{key}.narinfo").unlink()
        _plant(world.chunk(item), "dir")
    world.manifest.unlink()
    r = world.save(timeout=20)
    assert_fails(r, ChunkStoreError.exit_code, naming=item["path"])
    graph = {"items": [{"path": i.path, "references": list(i.references)}
                       for i in world.src.infos]}
    saved = {i["path"] for i in load(world.manifest)["items"]}
    assert saved == {i.path for i in world.src.infos} - with_referrers(graph, item["path"])


# === fail before touching the store; nothing half-registered ===================================


def test_swap_refused_by_a_daemon_session_extracts_nothing(world: World) -> None:
    db_dir = world.dst / "var" / "guix" / "db"
    make_db(db_dir / "db.sqlite")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(db_dir / 'big-lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.lockf(fd, fcntl.LOCK_SH)\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        r = world.restore("--db-mode", "swap")
        assert_fails(r, LockedError.exit_code, naming="big-lock")
        assert not world.store.exists() or not list(world.store.iterdir())
    finally:
        holder.kill()
        holder.wait()
    world.untouched_outside()


def test_failed_dependency_leaves_nothing_under_a_final_name(world: World) -> None:
    item = referenced_item(world.doc)
    data = bytearray(world.chunk(item).read_bytes())
    data[len(data) // 2] ^= 0x40
    world.put_chunk(item, bytes(data), follow=False)
    r = world.restore()
    assert_fails(r, ChunkCorruptError.exit_code, naming=item["path"])
    valid = world.consistent()
    assert set(valid) == set(world.paths) - with_referrers(world.doc, item["path"])


@pytest.mark.parametrize("mode", ["swap", "in-place"])
def test_registration_failure_takes_placed_items_out(world: World, mode: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The DB write fails after items were renamed into place: they are taken out again."""
    from incstore import manifest as manifest_mod

    def fail(*args: Any, **kw: Any) -> None:
        raise DatabaseError("disk on fire", item="db")

    monkeypatch.setattr(db, "swap_in" if mode == "swap" else "register_batch", fail)
    if mode == "in-place":
        make_db(world.db_path)
    m = manifest_mod.load(world.manifest)
    plan = plan_restore(m, world.dst, world.cache, db_mode=mode)  # type: ignore[arg-type]
    result = execute_restore(plan, jobs=2)
    assert result.error() is not None and isinstance(result.error(), IncstoreError)
    assert not result.registered
    assert world.consistent() == {}


def test_in_place_restore_without_a_db(world: World) -> None:
    """No live DB means no daemon session to race with: the DB is created whole, with every
    item, and nothing is left under a temporary name."""
    r = world.restore("--in-place")
    assert r.code == 0, r.err
    assert set(db.valid_paths(world.db_path, db.GUIX)) == {i.path for i in world.src.infos}
    assert not [p for p in world.store.iterdir() if p.name.startswith(".incstore-tmp-")]


def test_one_missing_external_skips_only_its_referrers(world: World) -> None:
    doc = world.doc
    present_ext = f"/gnu/store/{'1' * 32}-present-external"
    missing_ext = f"/gnu/store/{'2' * 32}-missing-external"
    y = doc["items"][6]
    lost = with_referrers(doc, y["path"])
    x = next(i for i in doc["items"] if i["path"] not in lost)
    x["references"] = sorted({*x["references"], present_ext})
    y["references"] = sorted({*y["references"], missing_ext})
    doc["external"] = [present_ext, missing_ext]
    dump(world.manifest, doc)
    world.store.mkdir(parents=True)
    f = world.store / present_ext[11:]
    f.write_text("provided by the target store\n")
    f.chmod(0o444)
    digest = nar.dump_hashed(f)
    make_db(world.db_path, [db.PathInfo(present_ext, digest.db_hash, digest.size, 1)])
    r = world.restore()
    assert_fails(r, StoreError.exit_code, naming=y["path"])
    valid = set(world.consistent(debris={present_ext}))
    assert valid == (set(world.paths) - lost) | {present_ext}


_FAKE_DAEMON = r"""
import os, subprocess, sys, time
fake, cli_args = sys.argv[1], sys.argv[2:]

def nobody():
    os.setgid(65534)
    os.setuid(65534)

daemon = subprocess.Popen([fake, "60"], preexec_fn=nobody)
for _ in range(200):
    try:
        if open(f"/proc/{daemon.pid}/comm").read().strip() == "guix-daemon":
            break
    except OSError:
        pass
    time.sleep(0.01)
try:
    sys.exit(subprocess.run([sys.executable, "-m", "incstore", *cli_args]).returncode)
finally:
    daemon.kill()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives restored files away")
def test_a_process_merely_named_guix_daemon_does_not_get_the_items(world: World) -> None:
    unshare, sleep = shutil.which("unshare"), shutil.which("sleep")
    if unshare is None or sleep is None:
        pytest.skip("needs unshare(1) and sleep(1)")
    bin_dir = Path(tempfile.mkdtemp(prefix="incstore-fake-daemon-"))  # reachable by nobody
    try:
        bin_dir.chmod(0o755)
        fake = bin_dir / "guix-daemon"
        os.symlink(sleep, fake)
        # in a PID namespace of its own, so no other restore on this machine sees the impostor
        done = subprocess.run(
            [unshare, "--fork", "--pid", "--mount-proc", sys.executable, "-c", _FAKE_DAEMON,
             str(fake), "restore", "--manifest", str(world.manifest), "--cache",
             str(world.cache), "--prefix", str(world.dst)],
            capture_output=True, text=True, timeout=60, check=False)
    finally:
        shutil.rmtree(bin_dir)
    if "unshare" in done.stderr and done.returncode != 0:
        pytest.skip(f"no PID namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    owners = {(st.st_uid, st.st_gid) for st in (os.lstat(world.store / p[11:])
                                                 for p in world.paths)}
    assert owners == {(0, 0)}, f"restored items belong to {owners}"


# === save must not reuse a bad chunk ===========================================================


def test_planted_narinfo_over_a_junk_chunk_is_not_reused(world: World) -> None:
    """The narinfo claims the right NarHash, size and xxh3; the chunk under it is junk: save
    checks the chunk against them and writes the item again."""
    item = referenced_item(world.doc)
    world.put_chunk(item, b"junk" * 100, follow=False)
    r = world.save()
    assert_ok(r)
    assert_ok(cli("check", "--full", "--cache", world.cache, "--manifest", world.manifest))
    assert_ok(world.restore())
    assert set(world.consistent()) == set(world.paths)


def _plant_self_consistent_narinfo(world: World, item: dict[str, Any]) -> None:
    """Junk under the item's key, and a narinfo that matches the junk's own size and xxh3."""
    junk = compress(b"not the item's NAR")
    world.put_chunk(item, junk, follow=False)
    narinfo = world.cache / f"{item['chunk']['key']}.narinfo"
    lines = [ln for ln in narinfo.read_text().splitlines()
             if not ln.startswith(("FileSize:", "X-Incstore-XXH3-128:"))]
    lines += [f"FileSize: {len(junk)}", f"X-Incstore-XXH3-128: {xxhash.xxh3_128(junk).hexdigest()}"]
    narinfo.write_text("\n".join(lines) + "\n")
    for manifest in (world.cache / "manifests").glob("*.json"):
        manifest.unlink()


def test_self_consistent_planted_narinfo_heals_after_one_restore(world: World) -> None:
    """Limitation, kept visible: with no manifest left that records the chunk, a narinfo
    written to match the junk chunk's own size and xxh3 passes save's cheap check (nothing
    trusted says otherwise); restore then finds the chunk corrupt and quarantines it, and the
    next save writes it again."""
    item = referenced_item(world.doc)
    _plant_self_consistent_narinfo(world, item)
    world.manifest.unlink()
    assert_ok(world.save())
    r = world.restore()
    assert_fails(r, (ChunkCorruptError.exit_code, NarFormatError.exit_code),
                 naming=item["path"])
    assert list((world.cache / "quarantine").iterdir())
    assert_ok(world.save())
    shutil.rmtree(world.dst)
    assert_ok(world.restore())
    assert set(world.consistent()) == set(world.paths)


def test_planted_narinfo_is_outvoted_by_the_previous_manifest(world: World) -> None:
    """The save's previous manifest (the --manifest file it replaces) records the chunk's
    true size and xxh3: the planted narinfo does not make the save reuse the junk."""
    item = referenced_item(world.doc)
    _plant_self_consistent_narinfo(world, item)
    assert_ok(world.save())
    assert_ok(world.restore())
    assert set(world.consistent()) == set(world.paths)


def test_chunk_restore_found_corrupt_is_written_again(world: World) -> None:
    item = referenced_item(world.doc)
    data = bytearray(world.chunk(item).read_bytes())
    data[len(data) // 2] ^= 0x40
    world.put_chunk(item, bytes(data), follow=False)
    assert_fails(world.restore(), ChunkCorruptError.exit_code, naming=item["path"])
    assert not world.chunk(item).exists() and list((world.cache / "quarantine").iterdir())
    r = world.save()
    assert_ok(r)
    assert world.chunk(item).exists()
    assert_ok(world.restore())
    assert set(world.consistent()) == set(world.paths)


@pytest.mark.parametrize("kind", ["symlink-outside", "regular-file"])
def test_quarantine_that_is_not_a_directory(world: World, kind: str) -> None:
    """`quarantine` planted as a symlink to elsewhere must not make restore (root) link a chunk
    outside the chunk store; planted as a file, it must not abort the whole restore."""
    item = referenced_item(world.doc)
    data = bytearray(world.chunk(item).read_bytes())
    data[len(data) // 2] ^= 0x40
    world.put_chunk(item, bytes(data), follow=False)
    if kind == "symlink-outside":
        os.symlink(str(world.outside), world.cache / "quarantine")
    else:
        (world.cache / "quarantine").write_text("not a directory")
    r = world.restore()
    assert_fails(r, ChunkCorruptError.exit_code, naming=item["path"])
    world.untouched_outside()
    assert set(world.consistent()) == set(world.paths) - with_referrers(world.doc, item["path"])


# === one line, right code ======================================================================


@pytest.mark.parametrize("case", ["nested-100000", "int-5000-digits", "registration-time-2^64",
                                  "manifest-is-a-directory"])
def test_manifest_that_used_to_traceback(world: World, case: str) -> None:
    text = world.manifest.read_text()
    if case == "nested-100000":
        world.manifest.write_text(text.rstrip()[:-1] + ',"tool":' + "[" * 100_000
                                  + "]" * 100_000 + "}")
    elif case == "int-5000-digits":
        doc = world.doc
        world.manifest.write_text(text.replace(f",{doc['items'][0]['nar_size']},",
                                               "," + "9" * 5000 + ",", 1))
    elif case == "registration-time-2^64":
        doc = world.doc
        doc["items"][0]["registration_time"] = 1 << 64
        dump(world.manifest, doc)
    else:
        world.manifest.unlink()
        world.manifest.mkdir()
    r = world.restore()
    assert_fails(r, ManifestError.exit_code, naming=(
        "bad registration_time" if case.startswith("registration") else str(world.manifest)))
    assert not world.dst.exists()


def test_non_utf8_nix_cache_info(world: World) -> None:
    (world.cache / "nix-cache-info").write_bytes(b"StoreDir: /gnu/store\nPriority: 4\xe9\n")
    assert_fails(world.restore(), ChunkStoreError.exit_code, naming="nix-cache-info")


@pytest.mark.parametrize("kind", ["not-utf8", "empty", "fifo", "dir"])
def test_bad_schema_file(world: World, kind: str) -> None:
    make_db(world.db_path)
    schema = world.db_path.parent / "schema"
    if kind in ("fifo", "dir"):
        _plant(schema, kind)
    else:
        schema.write_bytes(b"7\xff" if kind == "not-utf8" else b"")
    r = world.restore(timeout=20)
    assert_fails(r, DatabaseError.exit_code, naming="schema")


@pytest.mark.parametrize("what", ["regular-file", "fifo"])
def test_store_directory_that_is_not_a_directory(world: World, what: str) -> None:
    world.store.parent.mkdir(parents=True)
    if what == "fifo":
        os.mkfifo(world.store)
    else:
        world.store.write_text("not a directory")
    r = world.restore(timeout=20)
    assert_fails(r, StoreError.exit_code, naming=str(world.store))


@pytest.fixture
def exclusive_db(world: World) -> Iterator[Path]:
    """Another process holding the target DB in an SQLite EXCLUSIVE transaction."""
    make_db(world.db_path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, time\n"
         f"c = sqlite3.connect({str(world.db_path)!r}, isolation_level=None)\n"
         "c.execute('begin exclusive')\n"
         "c.execute(\"insert into ValidPaths (path, hash, registrationTime, narSize) "
         "values ('/gnu/store/x', 'h', 1, 1)\")\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        yield world.db_path
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("mode", [["--db-mode", "swap"], ["--in-place"]])
def test_db_held_exclusive_is_locked_not_corrupt(world: World, exclusive_db: Path,
                                                  mode: list[str]) -> None:
    r = world.restore(*mode, env={"INCSTORE_DB_TIMEOUT": "1"}, timeout=20)
    assert_fails(r, LockedError.exit_code, naming="locked")
    assert r.seconds < 10
    assert not world.store.exists() or not list(world.store.iterdir())


def test_db_held_exclusive_on_save(world: World, exclusive_db: Path) -> None:
    r = cli("save", "--db", exclusive_db, "--cache", world.cache, "--manifest",
            world.dst / "m.json", env={"INCSTORE_DB_TIMEOUT": "1"}, timeout=20)
    assert_fails(r, LockedError.exit_code, naming="locked")


def test_error_text_quoting_input_is_escaped(world: World, tmp_path: Path) -> None:
    """A newline in a path from the command line or the chunk store cannot start a line of its
    own (such as a forged `::error::` GitHub Actions annotation)."""
    evil = tmp_path / "m\n::error::forged.json"
    evil.write_text("[")
    r = cli("restore", "--manifest", evil, "--cache", world.cache, "--prefix", world.dst)
    assert_fails(r, ManifestError.exit_code)
    evil_cache = tmp_path / "c\n::error::forged"
    shutil.copytree(world.cache, evil_cache)
    item = referenced_item(world.doc)
    _plant(evil_cache / "nar" / f"{item['chunk']['key']}.nar.zst", "fifo")
    r2 = cli("restore", "--manifest", world.manifest, "--cache", evil_cache, "--prefix",
             world.dst, timeout=20)
    assert r2.code != 0
    for run in (r, r2):
        assert_one_line(run)
        assert not any(ln.startswith("::") for ln in run.err.splitlines()), run.err


# === S3: a listing with a key that is not a valid name =========================================


def test_s3_listing_with_a_dotdot_key(moto: Any, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """One object whose key has a `..` segment (or other odd names) must not make every save,
    gc, check and stats fail: such keys are skipped."""
    for k, v in moto.env.items():
        monkeypatch.setenv(k, v)
    bucket = moto.create_bucket(f"hostile-{os.getpid()}")
    url = f"s3://{bucket}/cache"
    src = make_sample(tmp_path / "src", items=3, seed=31)
    save = ("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", url,
            "--name", "main")
    assert_ok(cli(*save))
    for key in ["cache/nar/../evil.nar.zst", "cache/manifests/../x.json", "cache/a/../b",
                "cache/nar/./dot", "cache/nar//empty-segment"]:
        quoted = urllib.parse.quote(key.replace("..", "%2E%2E"), safe="/%")
        urllib.request.urlopen(urllib.request.Request(
            f"{moto.endpoint}/{bucket}/{quoted}", data=b"x", method="PUT"), timeout=10).close()
    for command in (save, ("gc", "--cache", url), ("check", "--cache", url),
                    ("stats", "--cache", url),
                    ("restore", "--name", "main", "--cache", url, "--prefix", tmp_path / "dst")):
        r = cli(*command, timeout=60)
        assert_ok(r)


def test_s3_raw_listing_is_signed_as_botocore_signs() -> None:
    """The fallback listing signs its own requests (SigV4); moto does not check signatures, so
    compare with botocore's signer, when it is installed (it comes with moto)."""
    auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
    from botocore.credentials import Credentials  # type: ignore[import-untyped]

    from incstore.s3 import _quote, _sign

    query = {"list-type": "2", "delimiter": "/", "encoding-type": "url",
             "prefix": "ca che/nar+x/~é", "continuation-token": "a/b+c=="}
    for token in (None, "session/token+="):
        for url in ("http://127.0.0.1:9000/bucket", "https://bucket.s3.eu-west-3.amazonaws.com/"):
            full = url + "?" + "&".join(f"{_quote(k)}={_quote(v)}"
                                        for k, v in sorted(query.items()))
            request = AWSRequest(method="GET", url=full, headers={
                "x-amz-content-sha256": hashlib.sha256(b"").hexdigest()})
            auth.SigV4Auth(Credentials("AKID", "SECRET", token), "s3", "eu-west-3"
                           ).add_auth(request)
            when = datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ"
                                     ).replace(tzinfo=timezone.utc)
            mine = _sign("GET", url, query, region="eu-west-3", access_key="AKID",
                         secret_key="SECRET", token=token, now=when)
            assert mine["authorization"] == request.headers["Authorization"]


def test_a_restore_with_nothing_to_do_still_sweeps_dead_runs(world: World) -> None:
    """Killed restores leave temporary trees; the next restore removes them even when every
    item is present already (it used to sweep only when it extracted something)."""
    assert world.restore().code == 0
    child = subprocess.Popen(["true"])
    child.wait()
    stale = world.store / f".incstore-tmp-{child.pid}-0-{'a' * 32}"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "f").write_text("x")
    for d in (stale / "sub", stale):
        d.chmod(0o555)
    db_copy = world.db_path.parent / f".tmp-incstore-{child.pid}-0-db.sqlite"
    db_copy.write_bytes(b"half a DB")
    r = world.restore("--json")
    assert r.code == 0, r.err
    assert not stale.exists() and not db_copy.exists()
    assert set(world.consistent()) == set(world.paths)
