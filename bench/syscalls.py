"""System calls per item: what incstore and the monolith ask of the kernel in each scenario on
the 2,076-item reference store, counted under `strace -f`. Wall time on a disk swings with the
disk's mood; these counts do not, so they say what a disk row pays for.

    python3 bench/syscalls.py [--items 2076] [--incstore-ref REF] [--dir /dev/shm]
                              [--no-monolith] [--keep-traces]

The scenarios of bench/growth.py, in the order they build on each other: cold save (an empty
chunk store / a new archive), save with nothing new, restore into an empty store, restore with
90% present (10% of the items, leaves first, deleted and unregistered; the monolith extracts
its whole archive over the same tree with those items deleted), no-op restore; plus the
interpreter start (`incstore --version`; `bash -c true` for the monolith's shell), the fixed
cost in every incstore row. incstore runs through its CLI only; the monolith is the bench's
`tar -c gnu/store var/guix/db | zstd -T0 -3` and `zstd -d | tar -x` (bench/measure.py), shell
included.

Each command runs once under `strace -f -C -qq -y -s 0`: `-C` is `-c`'s summary (calls per
system call, all threads and children) plus the trace lines it comes from; `-y` names what each
descriptor is. From the summary: all calls, futex (threads waking each other: apart, and the
rest per item), fsync, fdatasync, syncfs. From the trace:
files created (opens with O_CREAT, and mkdir, link, symlink, rename, any variant: calls, failed
ones included, so an O_CREAT open of a file that exists counts too), and writes (write,
pwrite64, writev, pwritev, pwritev2) to files (with the bytes they wrote) and to pipes.

Counts are per item of the store (2,076), whatever share of it a scenario touches, so rows
compare. The commands run in --dir (tmpfs by default, to be quick): incstore asks the same of
every file system, so where they run does not change what is counted. strace slows every call,
which can change how often threads wait on each other: futex counts vary from run to run, the
file-system counts do not.

Prints two Markdown tables (the counts, and each command's most frequent calls) and writes them
to bench/out/syscalls.md; the traces are deleted once counted, unless --keep-traces.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import daemondb, guixstore
from bench.guixstore import StoreSpec
from bench.measure import INCSTORE, tar_create, tar_extract, wipe
from bench.run import use_incstore

OUT = guixstore.OUT
SYNCS = ("fsync", "fdatasync", "syncfs")
OPENS = ("open", "openat", "openat2")
# what else creates a directory entry, by the name the table gives it
CREATES = {"mkdir": ("mkdir", "mkdirat"), "link": ("link", "linkat"),
           "symlink": ("symlink", "symlinkat"), "rename": ("rename", "renameat", "renameat2")}
WRITES = ("write", "pwrite64", "writev", "pwritev", "pwritev2")
_BY_NAME = {name: kind for kind, names in CREATES.items() for name in names}
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_LINE = re.compile(r"(\d+)\s+(.*)")
_START = re.compile(r"(\w+)\((.*)")
_RESUMED = re.compile(r"<\.\.\. (\w+) resumed>(.*)")
_FD = re.compile(r"\d+<([^>]*)>")
# the return value: the last "= N" of the line (an error's text after it has no "=")
_RET = re.compile(r"=\s+(-?\d+)[^=]*$")


@dataclass
class Counts:
    """What one command asked of the kernel."""

    calls: Counter[str] = field(default_factory=Counter)  # strace's summary: name -> calls
    traced: int = 0  # calls seen in the trace, to check the summary against
    creat_opens: int = 0
    creates: Counter[str] = field(default_factory=Counter)  # CREATES kind -> calls
    file_writes: int = 0
    file_write_bytes: int = 0
    pipe_writes: int = 0
    other_writes: int = 0  # to a socket, a tty, /dev/null...

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @property
    def unlocked(self) -> int:
        """Calls other than futex: threads waking each other, whose count strace's slowing
        changes and the store does not decide."""
        return self.total - self.calls["futex"]

    @property
    def created(self) -> int:
        return self.creat_opens + sum(self.creates.values())


def _write_target(args: str) -> str:
    """"file", "pipe" or "other", from the `-y` annotation of a write's descriptor."""
    m = _FD.match(args)
    target = m.group(1) if m else ""
    if target.startswith("pipe:"):
        return "pipe"
    # a path; under /dev a device (null, a tty), except in /dev/shm, where --dir may be
    if target.startswith("/") and (target.startswith("/dev/shm/")
                                   or not target.startswith("/dev/")):
        return "file"
    return "other"


def parse(trace: Path) -> Counts:
    """Count a `strace -f -C -y` output file: its trace lines, then its summary."""
    counts = Counts()
    pending: dict[str, str] = {}  # pid -> what its unfinished write writes to
    in_summary = False
    with trace.open(errors="replace") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if in_summary:
                cols = line.split()
                # "% time seconds usecs/call calls [errors] syscall"; the errors column is
                # empty when there were none
                if len(cols) >= 5 and cols[-1] != "total" and cols[3].isdigit():
                    counts.calls[cols[-1]] += int(cols[3])
                continue
            if line.startswith("% time"):
                in_summary = True
                continue
            m = _LINE.match(line)
            if not m:
                continue
            pid, rest = m.groups()
            resumed = _RESUMED.match(rest)
            if resumed:
                kind = pending.pop(pid, None)
                ret = _RET.search(rest)
                if kind == "file" and ret and int(ret.group(1)) > 0:
                    counts.file_write_bytes += int(ret.group(1))
                continue
            start = _START.match(rest)
            if not start:  # "+++ exited", "--- SIGCHLD": not calls
                continue
            name, args = start.groups()
            counts.traced += 1
            if name == "creat" or (name in OPENS and "O_CREAT" in _QUOTED.sub('""', args)):
                counts.creat_opens += 1
            elif name in _BY_NAME:
                counts.creates[_BY_NAME[name]] += 1
            elif name in WRITES:
                kind = _write_target(args)
                if kind == "file":
                    counts.file_writes += 1
                elif kind == "pipe":
                    counts.pipe_writes += 1
                else:
                    counts.other_writes += 1
                if args.endswith("<unfinished ...>"):
                    pending[pid] = kind
                else:
                    ret = _RET.search(args)
                    if kind == "file" and ret and int(ret.group(1)) > 0:
                        counts.file_write_bytes += int(ret.group(1))
    if not counts.calls:
        raise SystemExit(f"{trace}: no strace summary (was it killed?)")
    # the summary counts every call; the trace a call once it started. They differ by the
    # odd call strace saw start but not finish (a thread killed mid-call, exit); more is a
    # parsing error worth knowing about
    if abs(counts.traced - counts.total) > max(20, counts.total // 200):
        print(f"warning: {trace.name}: {counts.traced} calls in the trace, {counts.total} in "
              f"the summary", file=sys.stderr)
    return counts


def traced(argv: list[str], trace: Path) -> Counts:
    """Run `argv` under strace and count what it did; a failing command stops the bench."""
    strace = ["strace", "-f", "-C", "-qq", "-y", "-s", "0", "-o", str(trace), "--", *argv]
    done = subprocess.run(strace, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd="/")  # cwd "/": see measure.timed
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}) under strace: {argv}\n{done.stderr}")
    return parse(trace)


@dataclass
class Result:
    scenario: str
    tool: str  # "incstore" or "monolith"
    counts: Counts


def _per(n: int, items: int) -> str:
    return f"{n / items:.2f}" if n < 10 * items else f"{n / items:.1f}"


def tables(results: list[Result], items: int) -> str:
    """The counts table and the top-calls table, Markdown."""
    lines = [
        "| scenario | tool | calls | futex | other calls / item | fsync | fdatasync | syncfs | "
        "created / item | O_CREAT opens | mkdir | link | symlink | rename | file writes / "
        "item | file writes | MB written | pipe writes |",
        "|" + "---|" * 18]
    for r in results:
        c = r.counts
        lines.append(
            f"| {r.scenario} | {r.tool} | {c.total:,} | {c.calls['futex']:,} | "
            f"{_per(c.unlocked, items)} | " + " | ".join(f"{c.calls[s]:,}" for s in SYNCS) +
            f" | {_per(c.created, items)} | {c.creat_opens:,} | " +
            " | ".join(f"{c.creates[k]:,}" for k in CREATES) +
            f" | {_per(c.file_writes, items)} | {c.file_writes:,} | "
            f"{c.file_write_bytes / 1e6:,.1f} | {c.pipe_writes:,} |")
    lines += ["", "Most frequent calls, per item:", "",
              "| scenario | tool | calls per item |", "|---|---|---|"]
    for r in results:
        top = ", ".join(f"{name} {_per(n, items)}" for name, n in r.counts.calls.most_common(8))
        lines.append(f"| {r.scenario} | {r.tool} | {top} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2076, help="store size [default: 2076]")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"),
                        help="where the chunk store, archive and restores go [default: "
                        "/dev/shm]: the counts do not depend on it")
    parser.add_argument("--no-monolith", action="store_true", help="count incstore only")
    parser.add_argument("--keep-traces", action="store_true",
                        help="keep the traces in bench/out/syscalls/")
    parser.add_argument("--incstore-ref", metavar="REF",
                        help="count the incstore of this git revision, not the working tree")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        raise SystemExit("bench/syscalls.py needs strace (apt-get install -y strace)")
    timing = use_incstore(args.incstore_ref)
    print(f"counting {timing}", file=sys.stderr)
    prefix, summary = guixstore.cached(StoreSpec(args.items, args.seed))
    print(summary.line(), file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="incstore-syscalls-", dir=args.dir))
    traces = OUT / "syscalls" if args.keep_traces else work / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    cache, manifest, archive = work / "cache", work / "m.json", work / "store.tar.zst"
    dst, base_dst = work / "dst", work / "base"
    save = [*INCSTORE, "save", "--db", str(daemondb.db_path(prefix)), "--prefix", str(prefix),
            "--cache", str(cache), "--manifest", str(manifest)]
    restore = [*INCSTORE, "restore", "--manifest", str(manifest), "--cache", str(cache),
               "--prefix", str(dst)]
    dropped: list[int] = []

    def empty() -> None:
        wipe(dst)
        wipe(base_dst)

    def drop() -> None:
        dropped.append(daemondb.drop(dst, 0.10, mirrors=[base_dst]).items)

    # (scenario, what to do first, incstore's command, the monolith's): in this order, each
    # starting from the state the one before left
    steps: list[tuple[str, Callable[[], object] | None, list[str], str]] = [
        ("interpreter start", None, [*INCSTORE, "--version"], "true"),
        ("cold save", lambda: wipe(cache), save, tar_create(prefix, archive)),
        ("save, nothing new", None, save, tar_create(prefix, archive)),
        ("restore, empty store", empty, restore, tar_extract(archive, base_dst)),
        ("restore, 90% present", drop, restore, tar_extract(archive, base_dst)),
        ("no-op restore", None, restore, tar_extract(archive, base_dst)),
    ]
    results: list[Result] = []
    try:
        for scenario, setup, ours, base in steps:
            if setup is not None:
                setup()
            slug = re.sub(r"[^a-z0-9]+", "-", scenario).strip("-")
            sides = [("incstore", ours)] + ([] if args.no_monolith else
                                            [("monolith", ["bash", "-c", base])])
            for tool, argv in sides:
                print(f"  {scenario}: {tool} under strace ...", file=sys.stderr, flush=True)
                trace = traces / f"{slug}.{tool}.strace"
                results.append(Result(scenario, tool, traced(argv, trace)))
                if not args.keep_traces:
                    trace.unlink()
    finally:
        wipe(work)
    text = "\n".join([
        "# System calls per item", "", f"Store: {summary.line()}.", "",
        f"incstore: {timing}. One run each under `strace -f -C`; per item of the "
        f"{summary.items:,}; the 90%-present restore put back {dropped[0] if dropped else 0:,} "
        f"items. The monolith's counts include its shell (`bash -c`: see the interpreter "
        f"start row); futex counts vary with thread timing.", "",
        tables(results, summary.items), ""])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "syscalls.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
