"""Where incstore's per-item time goes, on the 2,076-item reference store.

    python3 bench/profile.py [--items 2076] [--incstore-ref REF]

Runs, through the CLI only, the commands whose per-item cost matters (cold save, save with
nothing new, restore into an empty store on tmpfs and on disk, no-op restore) three ways each:

- `python3 -X importtime -m incstore ...`: import cost, summed per top-level package;
- cProfile in every thread (`_THREADED_CPROFILE`: incstore does its per-item work in a
  thread pool, which plain `python3 -m cProfile` does not see), merged: the top functions by
  own and cumulative time, summed over threads (so above wall time when two workers run);
- `strace -c -f`: system calls by count and time (if strace is installed).

Everything lands in bench/out/profile/ (`*.importtime`, `*.prof`, `*.cprofile.txt`,
`*.strace`), and a digest is printed. Timings under a profiler are inflated (cProfile about 2x
on this code), so read them as shares, not as wall times.

For counts that do not depend on the disk's mood (system calls, syncs, files created and
writes per item, for incstore and the monolith in each scenario), see bench/syscalls.py.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import daemondb, guixstore
from bench.guixstore import StoreSpec
from bench.measure import wipe
from bench.run import use_incstore

OUT = guixstore.OUT / "profile"
PY = [sys.executable]
# Runs `python3 -m incstore ARGS` with a cProfile.Profile in the main thread and in each thread
# it starts, and writes their merged stats to $BENCH_PROFILE_OUT.
_THREADED_CPROFILE = """
import cProfile, os, pstats, runpy, sys, threading
profiles = [cProfile.Profile()]
_run = threading.Thread.run
def run(self):
    p = cProfile.Profile()
    profiles.append(p)
    p.enable()
    try:
        _run(self)
    finally:
        p.disable()
threading.Thread.run = run
sys.argv = ["incstore", *sys.argv[1:]]
profiles[0].enable()
try:
    runpy.run_module("incstore", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
else:
    code = 0
finally:
    profiles[0].disable()
    stats = pstats.Stats(profiles[0])
    for p in profiles[1:]:
        stats.add(p)
    stats.dump_stats(os.environ["BENCH_PROFILE_OUT"])
sys.exit(code)
"""


def _run(argv: list[str], stderr_to: Path | None = None,
         env: dict[str, str] | None = None) -> None:
    err = stderr_to.open("wb") if stderr_to else subprocess.DEVNULL
    try:
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=err, check=True, cwd="/",
                       env={**os.environ, **(env or {})})
    finally:
        if stderr_to:
            err.close()  # type: ignore[union-attr]


def importtime_digest(path: Path, top: int = 12) -> str:
    """Cumulative import time of the slowest top-level imports."""
    rows = []
    for line in path.read_text().splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(3)) == 1:  # a top-level import
            rows.append((int(m.group(2)), m.group(4)))
    total = sum(r[0] for r in rows)
    rows.sort(reverse=True)
    return "\n".join([f"  total top-level imports {total / 1000:.0f} ms"]
                     + [f"  {us / 1000:7.1f} ms  {name}" for us, name in rows[:top]])


def cprofile_digest(path: Path, top: int = 18) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def strace_digest(path: Path, top: int = 12) -> str:
    lines = path.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("% time")), None)
    if start is None:
        return "  (no strace summary)"
    body = lines[start:]
    if len(body) > top + 4:  # the top rows, then the separator and the total
        body = body[: top + 2] + body[-2:]
    return "\n".join("  " + ln for ln in body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2076)
    parser.add_argument("--only", default="importtime,cprofile,strace",
                        type=lambda s: s.split(","), help="which of the three to run")
    parser.add_argument("--runs", default="", type=lambda s: [r for r in s.split(",") if r],
                        help="which commands (save-cold, save-nothing-new, restore-empty, "
                        "restore-noop, restore-empty-disk) [default: all]")
    parser.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--incstore-ref", metavar="REF",
                        help="profile the incstore of this git revision, not the working tree")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"profiling {use_incstore(args.incstore_ref)}")
    prefix, summary = guixstore.cached(StoreSpec(args.items))
    print(summary.line())
    work = Path(tempfile.mkdtemp(prefix="incstore-profile-", dir="/var/tmp"))
    dst = Path(tempfile.mkdtemp(prefix="incstore-profile-", dir=args.shm_dir)) / "dst"
    disk_dst = work / "dst"
    cache, manifest = work / "cache", work / "m.json"
    save = ["save", "--db", str(daemondb.db_path(prefix)), "--prefix", str(prefix), "--cache",
            str(cache), "--manifest", str(manifest)]
    restore = ["restore", "--manifest", str(manifest), "--cache", str(cache), "--prefix",
               str(dst)]
    # (label, incstore arguments, what to reset before each run)
    restore_disk = [*restore[:-1], str(disk_dst)]
    runs = [("save-cold", save, lambda: wipe(cache)), ("save-nothing-new", save, None),
            ("restore-empty", restore, lambda: wipe(dst)), ("restore-noop", restore, None),
            ("restore-empty-disk", restore_disk, lambda: wipe(disk_dst))]
    runs = [r for r in runs if not args.runs or r[0] in args.runs]
    strace = shutil.which("strace")
    try:
        for label, cli, reset in runs:
            for kind in args.only:
                if reset:
                    reset()
                base = OUT / label
                if kind == "importtime":
                    _run([*PY, "-X", "importtime", "-m", "incstore", *cli],
                         stderr_to=base.with_suffix(".importtime"))
                elif kind == "cprofile":
                    _run([*PY, "-c", _THREADED_CPROFILE, *cli],
                         env={"BENCH_PROFILE_OUT": str(base.with_suffix(".prof"))})
                    base.with_suffix(".cprofile.txt").write_text(
                        cprofile_digest(base.with_suffix(".prof")))
                elif strace:
                    _run([strace, "-c", "-f", "-o", str(base.with_suffix(".strace")), *PY, "-m",
                          "incstore", *cli])
            print(f"\n=== {label}: incstore {' '.join(cli[:1])}")
            if base.with_suffix(".importtime").exists():
                print(importtime_digest(base.with_suffix(".importtime")))
            if base.with_suffix(".cprofile.txt").exists():
                print(base.with_suffix(".cprofile.txt").read_text())
            if base.with_suffix(".strace").exists():
                print(strace_digest(base.with_suffix(".strace")))
    finally:
        wipe(work)
        wipe(dst.parent)
    print(f"\nfiles in {OUT}")


if __name__ == "__main__":
    main()
