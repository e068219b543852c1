"""Fuzz target over the whole restore path: manifest, chunks, narinfos, nix-cache-info and the
prior state of the target store, mutated together.

The examples run in one child Python process (`python -c` importing this module), so that a
hang can be killed and the child's peak RSS measured on its own (its VmHWM). For each
example the child builds a fresh tree from a small saved sample store:

- the chunk store, with per-item damage: flipped or cut bytes, a tail (small, or a sparse
  4 GiB skippable frame), another item's chunk, a decompression bomb, a frame without checksum
  or declaring the wrong content size, a FIFO, directory or symlink (outside, or /dev/zero)
  where the chunk should be, no chunk; narinfos garbled, missing or FIFOs; `nix-cache-info`
  wrong, not UTF-8, missing, a FIFO, a directory or a symlink; `quarantine/` a symlink to
  outside or a file;
- the manifest: a field of an item set to another value (sizes, hashes, chunk records, keys,
  references) or bytes flipped or cut;
- the target store: files, directories, FIFOs, symlinks pointing outside, unreadable trees at
  an item's final name, at its `.lock` (also non-empty), at a stale temporary name, at
  `gc.lock` and `big-lock`; sometimes a DB that already registers some items (half of them
  on disk), or a DB file or `schema` file that is garbage;
- the DB mode (auto, swap, in-place, db-out) and the number of workers.

It then runs `manifest.load`, `plan_restore` and `execute_restore` under an alarm and reports,
per example: the type of any exception other than `IncstoreError` that escaped, an
`IncstoreError` with the internal-error code 1, any change in a sentinel directory outside the
target (the target of every planted symlink), any registered path missing or hashing wrong, any
unregistered item left under its final name, and the wall time. The parent asserts none of
these happened, that no example took more than a few seconds, and that the child's peak RSS
stayed under 200 MB from the first example on. Hypothesis runs derandomized with no example
database, so CI sees the same examples every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "250"))
EXAMPLE_SECONDS = 5.0  # an example taking longer than this is a hang
CHILD_SECONDS = 90.0  # the whole child, loaded machine included
RSS_LIMIT_MB = 200

# --- the parent: one test ---------------------------------------------------------------------


def test_fuzz_whole_restore_path(tmp_path: Path) -> None:
    report = tmp_path / "report.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tests.test_fuzz_restore import child_main; child_main()",
         str(report), str(tmp_path / "work")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=CHILD_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        last = report.read_text().splitlines()[-1:] if report.exists() else []
        raise AssertionError(f"the fuzz child hung; last record: {last}") from None
    records = [json.loads(line) for line in report.read_text().splitlines()]
    done = [r for r in records if r["kind"] == "example"]
    assert proc.returncode == 0, (proc.returncode, output[-3000:], records[-2:])
    assert len(done) >= EXAMPLES * 0.9, f"only {len(done)} examples ran: {output[-2000:]}"
    problems = [r for r in done if r["problems"]]
    assert not problems, json.dumps(problems[:5], indent=1)
    slow = [r for r in done if r["seconds"] > EXAMPLE_SECONDS]
    assert not slow, json.dumps(slow[:5], indent=1)
    # the child's own VmHWM: the rusage of a child (wait4, RUSAGE_CHILDREN) also counts the
    # pytest pages it shared between fork (or vfork) and exec
    summary = [r for r in records if r["kind"] == "summary"]
    assert summary, "the child did not finish"
    assert summary[0]["peak_mb"] < RSS_LIMIT_MB, f"child peak RSS {summary[0]['peak_mb']:.0f} MB"
    # the mutations reach the deep checks, not only the manifest reader
    outcomes = {r["outcome"] for r in done}
    assert {"ok", "ManifestError", "ChunkCorruptError"} <= outcomes and len(outcomes) >= 6, \
        outcomes


# --- the child --------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm: an example ran past EXAMPLE_SECONDS * 2."""


@contextmanager
def alarm(seconds: float) -> Iterator[None]:
    def ring(signum: int, frame: object) -> None:
        raise Hang()

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # and again every second
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            body = (hashlib.sha256(Path(path).read_bytes()).hexdigest()
                    if stat.S_ISREG(st_.st_mode) else
                    os.readlink(path) if stat.S_ISLNK(st_.st_mode) else None)
            out[os.path.relpath(path, root)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, body)
    return out


def _bomb(nar_bytes: int) -> bytes:
    """A well-formed NAR of a directory of 1 MiB zero files, `nar_bytes` long in all."""
    from .test_nar import s, toks

    c = zstandard.ZstdCompressor(level=1, write_checksum=True,
                                 write_content_size=False).compressobj()
    out = [c.compress(s(b"nix-archive-1") + toks(b"(", b"type", b"directory"))]
    zeros = bytes(1 << 20)
    for n in range(nar_bytes >> 20):
        out.append(c.compress(toks(b"entry", b"(", b"name", b"f%04d" % n, b"node", b"(",
                                   b"type", b"regular", b"contents")
                              + (1 << 20).to_bytes(8, "little")))
        out += [c.compress(zeros), c.compress(toks(b")", b")"))]
    out += [c.compress(toks(b")")), c.flush()]
    return b"".join(out)


class Base:
    """The saved sample store every example starts from (built once in the child)."""

    def __init__(self, work: Path) -> None:
        from incstore import db
        from incstore.manifest import load
        from incstore.sample import SampleSpec, build
        from incstore.save import execute_save, plan_save

        self.dir = work / "base"
        src = self.dir / "src"
        build(src, db.GUIX, SampleSpec(items=6, blob_bytes=2048, modules=2, seed=77))
        execute_save(plan_save(src / "var/guix/db/db.sqlite", src, self.dir / "cache"),
                     self.dir / "m.json", jobs=1)
        self.manifest = json.loads((self.dir / "m.json").read_text())
        self.paths = [i[0] for i in self.manifest["items"]]
        self.nars = {
            i[7]: zstandard.ZstdDecompressor().decompressobj().decompress(
                (self.dir / "cache" / "nar" / f"{i[7]}.nar.zst").read_bytes())
            for i in self.manifest["items"]}
        self.bomb = _bomb(64 << 20)
        self.db_rows = db.read_snapshot(src / "var/guix/db/db.sqlite").infos
        assert len(load(self.dir / "m.json")) == len(self.paths)


# strategies: each mutation is a small tuple, applied by `build_example`
ITEM = st.integers(0, 63)  # taken modulo the item count
CHUNK_OPS = st.one_of(
    st.tuples(st.just("flip"), ITEM, st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("cut"), ITEM, st.integers(0, 1 << 16)),
    st.tuples(st.just("tail"), ITEM, st.sampled_from([1, 4096, 4 << 30])),
    st.tuples(st.just("other"), ITEM, ITEM, st.booleans()),
    st.tuples(st.just("bomb"), ITEM, st.booleans()),
    st.tuples(st.just("no-checksum"), ITEM, st.booleans()),
    st.tuples(st.just("content-size"), ITEM, st.integers(0, 1 << 40)),
    st.tuples(st.just("special"), ITEM, st.sampled_from(
        ["fifo", "dir", "link-outside", "link-zero", "missing"])),
    st.tuples(st.just("narinfo"), ITEM, st.sampled_from(["garbage", "missing", "fifo"])),
)
CACHE_INFO = st.sampled_from(["ok"] * 6 + ["other-store", "latin1", "missing", "fifo", "dir",
                                           "link-outside"])
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64),
                        st.sampled_from([0, 1, 2**63 - 1, 2**63]),
                        st.text(max_size=8), st.lists(st.integers(-1, 40), max_size=3))
MANIFEST_OPS = st.one_of(
    st.tuples(st.just("field"), ITEM, st.integers(0, 11), JSON_VALUES),
    st.tuples(st.just("nar_size"), ITEM, st.integers(-3, 3)),
    st.tuples(st.just("bytes"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16)),
)
PLACES = st.sampled_from(["final", "lock", "stale-temp", "gc.lock", "big-lock"])
KINDS = st.sampled_from(["file", "data-file", "dir", "tree", "fifo", "link-outside-dir",
                         "link-outside-file", "dangling", "locked-tree"])
STATE_OPS = st.tuples(PLACES, ITEM, KINDS)


def _plant(path: Path, kind: str, outside: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path):
        return
    if kind in ("file", "data-file"):
        path.write_bytes(b"planted" if kind == "data-file" else b"")
    elif kind == "dir":
        path.mkdir()
    elif kind in ("tree", "locked-tree"):
        (path / "a" / "b").mkdir(parents=True)
        (path / "a" / "b" / "f").write_text("x")
        os.symlink(str(outside), path / "a" / "out")
        if kind == "locked-tree":
            for d in (path / "a" / "b", path / "a", path):
                d.chmod(0)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link-outside-dir":
        os.symlink(str(outside), path)
    elif kind == "link-outside-file":
        os.symlink(str(outside / "precious"), path)
    else:
        os.symlink(str(outside / "nothing-here"), path)


def _write_chunk(cache: Path, key: str, data: bytes) -> None:
    path = cache / "nar" / f"{key}.nar.zst"
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.write_bytes(data)


def build_example(base: Base, root: Path, chunk_ops: list[tuple[Any, ...]], cache_info: str,
                  quarantine: str, manifest_ops: list[tuple[Any, ...]],
                  state_ops: list[tuple[Any, ...]], registered: int, db_state: str
                  ) -> tuple[Path, Path, Path, Path]:
    """Lay out one example under `root`: (chunk store, manifest, target prefix, outside)."""
    outside = root / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "precious").write_text("keep")
    cache = root / "cache"
    shutil.copytree(base.dir / "cache", cache)
    doc = json.loads(json.dumps(base.manifest))
    items = doc["items"]
    n_items = len(items)
    # tails last: a sparse 4 GiB tail must not be read back by a later op of this harness
    for op in sorted(chunk_ops, key=lambda op: op[0] == "tail"):
        item = items[op[1] % n_items]
        key = item[7]
        chunk = cache / "nar" / f"{key}.nar.zst"
        follow = False
        if op[0] in ("flip", "cut", "tail") and not chunk.is_file():
            continue
        if op[0] == "flip":
            data = bytearray(chunk.read_bytes())
            if not data:
                continue
            data[op[2] % len(data)] ^= op[3]
            _write_chunk(cache, key, bytes(data))
        elif op[0] == "cut":
            _write_chunk(cache, key, chunk.read_bytes()[: op[2] % max(1, chunk.stat().st_size)])
        elif op[0] == "tail":
            with open(chunk, "r+b") as f:
                f.seek(0, os.SEEK_END)
                if op[2] > 1 << 20:  # a sparse skippable frame: costless unless read
                    f.write(struct.pack("<II", 0x184D2A50, 0xFFFFFFF0))
                    f.truncate(f.tell() + op[2])
                else:
                    f.write(b"\0" * op[2])
        elif op[0] == "other":
            other = items[op[2] % n_items][7]
            _write_chunk(cache, key, (cache / "nar" / f"{other}.nar.zst").read_bytes()
                         if (cache / "nar" / f"{other}.nar.zst").is_file() else b"")
            follow = op[3]
        elif op[0] == "bomb":
            _write_chunk(cache, key, base.bomb)
            follow = op[2]
        elif op[0] == "no-checksum":
            _write_chunk(cache, key, zstandard.ZstdCompressor(write_checksum=False).compress(
                base.nars[key]))
            follow = op[2]
        elif op[0] == "content-size":
            params = zstandard.ZstdCompressionParameters.from_level(
                3, write_checksum=True, write_content_size=True)
            frame = zstandard.ZstdCompressor(compression_params=params).compress(base.nars[key])
            # make the header declare another content size: small inputs get single-segment
            # frames, whose declared size starts right after the frame header descriptor
            header = bytearray(frame)
            header[5] ^= op[2] & 0xFF or 1
            _write_chunk(cache, key, bytes(header))
            follow = True
        elif op[0] == "special":
            if chunk.is_dir() and not chunk.is_symlink():
                shutil.rmtree(chunk)
            elif os.path.lexists(chunk):
                chunk.unlink()
            kind = op[2]
            if kind == "fifo":
                os.mkfifo(chunk)
            elif kind == "dir":
                chunk.mkdir()
            elif kind == "link-outside":
                os.symlink(str(outside / "precious"), chunk)
            elif kind == "link-zero":
                os.symlink("/dev/zero", chunk)
        elif op[0] == "narinfo":
            narinfo = cache / f"{key}.narinfo"
            if os.path.lexists(narinfo):
                narinfo.unlink()
            if op[2] == "garbage":
                narinfo.write_bytes(b"\xff\x00 not a narinfo")
            elif op[2] == "fifo":
                os.mkfifo(narinfo)
        if follow and chunk.is_file():
            written = chunk.read_bytes()
            item[8], item[9] = max(1, len(written)), xxhash.xxh3_128(written).hexdigest()
    cache_info_path = cache / "nix-cache-info"
    if cache_info != "ok":
        cache_info_path.unlink()
        if cache_info == "other-store":
            cache_info_path.write_text("StoreDir: /nix/store\n")
        elif cache_info == "latin1":
            cache_info_path.write_bytes(b"StoreDir: /gnu/store\n\xe9\n")
        elif cache_info == "fifo":
            os.mkfifo(cache_info_path)
        elif cache_info == "dir":
            cache_info_path.mkdir()
        elif cache_info == "link-outside":
            os.symlink(str(outside / "precious"), cache_info_path)
    if quarantine == "link-outside":  # where restore moves a chunk it found corrupt
        os.symlink(str(outside / "sub"), cache / "quarantine")
    elif quarantine == "file":
        (cache / "quarantine").write_text("not a directory")
    raw_ops = []
    for op in manifest_ops:
        if op[0] == "field":
            items[op[1] % n_items][op[2]] = op[3]
        elif op[0] == "nar_size":
            item = items[op[1] % n_items]
            if isinstance(item[2], int):
                item[2] = max(1, item[2] + op[2] * 8)
        else:
            raw_ops.append(op)
    data = bytearray(json.dumps(doc).encode())
    for op in raw_ops:
        if not data:
            break
        if op[0] == "bytes":
            data[op[1] % len(data)] = op[2]
        else:
            del data[op[1] % len(data):]
    manifest = root / "m.json"
    manifest.write_bytes(bytes(data))
    prefix = root / "dst"
    store = prefix / "gnu" / "store"
    store.mkdir(parents=True)
    db_dir = prefix / "var" / "guix" / "db"
    db_dir.mkdir(parents=True)
    if db_state == "garbage":
        (db_dir / "db.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    elif db_state == "empty-file":
        (db_dir / "db.sqlite").write_bytes(b"")
    elif db_state == "schema-garbage":
        (db_dir / "schema").write_bytes(b"7\xff\n")
    if registered and db_state not in ("garbage", "empty-file"):
        from incstore import db

        infos = [base.db_rows[p] for p in base.paths[:registered] if p in base.db_rows]
        closed = {i.path for i in infos}
        infos = [i for i in infos if set(i.references) <= closed]
        if infos:
            db.create(db_dir / "db.sqlite", db.GUIX, infos)
            # half of them present on disk, the others missing (to be replaced)
            for row in infos[::2]:
                source = base.dir / "src" / row.path.lstrip("/")
                if source.is_dir():
                    shutil.copytree(source, store / row.path[11:], symlinks=True)
                else:
                    shutil.copy2(source, store / row.path[11:])
    for place, index, kind in state_ops:
        name = base.paths[index % len(base.paths)][11:]
        target = {"final": store / name, "lock": store / f"{name}.lock",
                  "stale-temp": store / f".incstore-tmp-{2**22 + index}-0-{name[:32]}",
                  "gc.lock": prefix / "var" / "guix" / "gc.lock",
                  "big-lock": db_dir / "big-lock"}[place]
        _plant(target, kind, outside)
    return cache, manifest, prefix, outside


def check_store(prefix: Path, base: Base, planted: set[str]) -> list[str]:
    """Nothing half-registered: registered paths exist and hash right; unregistered items of
    the manifest are not under their final names (unless something was planted there)."""
    from incstore import nar

    problems = []
    db_path = prefix / "var" / "guix" / "db" / "db.sqlite"
    valid: dict[str, str] = {}
    if db_path.is_file():
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            valid = dict(conn.execute("select path, hash from ValidPaths"))
        except sqlite3.DatabaseError as e:
            problems.append(f"the DB is not a daemon DB after the restore: {e}")
        finally:
            conn.close()
    for path, nar_hash in valid.items():
        physical = prefix / path.lstrip("/")
        if not os.path.lexists(physical):
            problems.append(f"{path}: registered, missing on disk")
        elif nar.dump_hashed(physical).db_hash != nar_hash:
            problems.append(f"{path}: registered, NAR hash differs")
    for path in base.paths:
        if path not in valid and path[11:] not in planted and \
                os.path.lexists(prefix / path.lstrip("/")):
            problems.append(f"{path}: under its final name but not registered")
    return problems


def run_example(base: Base, root: Path, ops: dict[str, Any]) -> dict[str, Any]:
    from incstore import manifest as manifest_mod
    from incstore.errors import IncstoreError
    from incstore.restore import execute_restore, plan_restore

    cache, manifest, prefix, outside = build_example(
        base, root, **{k: v for k, v in ops.items() if k not in ("mode", "jobs")})
    checkable = ops["db_state"] not in ("garbage", "empty-file")
    planted = {base.paths[i % len(base.paths)][11:] for p, i, _ in ops["state_ops"]
               if p == "final"} | {p[11:] for p in base.paths[: ops["registered"]]}
    jobs = ops["jobs"]
    before = snapshot(outside)
    problems: list[str] = []
    outcome = "ok"
    start = time.monotonic()
    mode = ops["mode"]
    with alarm(EXAMPLE_SECONDS * 2):
        try:
            loaded = manifest_mod.load(manifest)
            plan = plan_restore(loaded, prefix, cache,
                                db_out=prefix / "out.sqlite" if mode == "out" else None,
                                db_mode=None if mode == "out" else mode)
            error = execute_restore(plan, jobs=jobs).error()
            if error is not None:
                raise error
        except IncstoreError as e:
            outcome = type(e).__name__
            if e.exit_code == 1:
                problems.append(f"IncstoreError with the internal-error code: {e}")
        except Hang:
            raise
        except Exception as e:  # anything else would be a traceback (or a catch-all line)
            outcome = type(e).__name__
            problems.append(f"{type(e).__name__} escaped: {e}\n"
                            + "".join(traceback.format_exc(limit=-6)))
    seconds = time.monotonic() - start
    if snapshot(outside) != before:
        problems.append("something outside the target changed")
    if mode != "out" and checkable:
        problems += check_store(prefix, base, planted)
    return {"kind": "example", "outcome": outcome, "problems": problems,
            "seconds": round(seconds, 3), "rss_mb": _memory_mb(), "ops": repr(ops)[:2000]}


def _memory_mb() -> tuple[float, float]:
    """This process's (current, peak) resident set, in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (proc(5), clear_refs "5"). On a fresh checkout
    Hypothesis builds its Unicode tables before the first example (about 200 MB for a moment,
    then cached under .hypothesis/): that is the harness, not the restore. Where the kernel
    refuses (an unusual sandbox), the peak keeps counting from the start."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _remove(root: Path) -> None:
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            path = os.path.join(dirpath, d)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
    shutil.rmtree(root, ignore_errors=True)


def child_main() -> None:
    report_path, work = Path(sys.argv[1]), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    base = Base(work)
    report = open(report_path, "a", buffering=1)  # noqa: SIM115 (kept open for the run)
    counter = iter(range(10**6))
    first = [True]

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(chunk_ops=st.lists(CHUNK_OPS, max_size=3), cache_info=CACHE_INFO,
           quarantine=st.sampled_from(["dir"] * 4 + ["link-outside", "file"]),
           manifest_ops=st.one_of(st.just([]), st.just([]), st.lists(MANIFEST_OPS, max_size=2)),
           state_ops=st.lists(STATE_OPS, max_size=4), registered=st.integers(0, 4),
           db_state=st.sampled_from(["fresh"] * 5 + ["garbage", "empty-file", "schema-garbage"]),
           mode=st.sampled_from(["auto", "auto", "swap", "in-place", "out"]),
           jobs=st.sampled_from([1, 2, 4]))
    def fuzz(chunk_ops: list[Any], cache_info: str, quarantine: str, manifest_ops: list[Any],
             state_ops: list[Any], registered: int, db_state: str, mode: str,
             jobs: int) -> None:
        if first:  # Hypothesis' one-time setup is done by now: measure from here on
            first.clear()
            _reset_peak()
        ops = {"chunk_ops": chunk_ops, "cache_info": cache_info, "quarantine": quarantine,
               "manifest_ops": manifest_ops,
               "state_ops": state_ops, "registered": registered, "db_state": db_state,
               "mode": mode, "jobs": jobs}
        root = Path(tempfile.mkdtemp(prefix=f"ex{next(counter)}-", dir=work))
        report.write(json.dumps({"kind": "start", "ops": repr(ops)[:2000]}) + "\n")
        try:
            record = run_example(base, root, ops)
        except Exception as e:  # the harness itself: reported, never shrunk by hypothesis
            record = {"kind": "example", "outcome": "harness", "seconds": 0,
                      "problems": [f"harness: {type(e).__name__}: {e}"],
                      "ops": repr(ops)[:2000]}
        except Hang:
            report.write(json.dumps({"kind": "example", "outcome": "hang", "seconds": 99,
                                     "problems": ["hang"], "ops": repr(ops)[:2000]}) + "\n")
            report.flush()
            os._exit(3)
        report.write(json.dumps(record) + "\n")
        _remove(root)

    fuzz()
    report.write(json.dumps({"kind": "summary", "peak_mb": _memory_mb()[1]}) + "\n")
    report.close()
