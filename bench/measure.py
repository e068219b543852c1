"""Timing for the bench: wall time and peak memory of one command and its whole process tree,
scenario rows with their samples, the monolithic baseline's commands, and the table.

incstore is only ever timed as a subprocess (`python3 -m incstore ...`), never through its
Python internals.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.daemondb import remove_tree

INCSTORE = [sys.executable, "-m", "incstore"]
GNU_TIME = shutil.which("time") or "/usr/bin/time"
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")
# a sample is retried when others used more than this share of one core during it
DISTURBED = 0.25
TRIES = 2
QUIET_WAIT = 10.0


@dataclass
class Sample:
    """One run: wall seconds, and peak memory in KiB.

    `peak_kb` is GNU time's %M, the largest peak RSS of any one process of the tree (exact, from
    the kernel's accounting; for `tar | zstd` it is the larger of the two, not their sum).
    `tree_kb` is the largest sum of RSS over the whole tree, sampled every 20 ms (it can miss a
    spike shorter than that). `peak` is the larger of the two.
    """

    seconds: float
    peak_kb: int
    tree_kb: int = 0
    # CPU seconds the rest of the machine (other processes, kernel threads, the hypervisor's
    # steal) used during the run: the machine is shared, and a busy neighbour skews a sample
    foreign_cpu: float = 0.0

    @property
    def peak(self) -> int:
        return max(self.peak_kb, self.tree_kb)

    @property
    def disturbed(self) -> bool:
        return self.foreign_cpu > DISTURBED * self.seconds


@dataclass
class Row:
    """One scenario: samples for incstore (`ours`) and for the monolithic baseline (`base`)."""

    scenario: str
    where: str
    ours: list[Sample] = field(default_factory=list)
    base: list[Sample] = field(default_factory=list)
    ours_bytes: int = 0
    base_bytes: int = 0
    items: int = 0  # store size, for the growth curve
    retries: int = 0  # pairs run again because the machine was busy (see `pair`)
    failed: str = ""  # why incstore or the baseline failed, if one did (no samples then)

    @staticmethod
    def med(samples: list[Sample]) -> float:
        return statistics.median(s.seconds for s in samples) if samples else float("nan")

    @staticmethod
    def peak(samples: list[Sample]) -> float:
        return max((s.peak for s in samples), default=0) / 1024

    @staticmethod
    def foreign(samples: list[Sample]) -> float:
        """The largest share of a core others used during a kept sample."""
        return max((s.foreign_cpu / s.seconds for s in samples if s.seconds), default=0.0)

    @property
    def ratio(self) -> float | None:
        return Row.med(self.ours) / Row.med(self.base) if self.base and self.ours else None

    @property
    def pair_ratios(self) -> list[float]:
        """incstore / baseline of each pair `pair` timed back to back: on a disk whose speed
        drifts between runs, each is taken under one run's conditions, where the median of
        each side may come from different runs."""
        return [o.seconds / b.seconds for o, b in zip(self.ours, self.base, strict=False)
                if b.seconds]

    def to_json(self) -> dict[str, object]:
        return {**{k: v for k, v in self.__dict__.items() if k not in ("ours", "base")},
                "ours": [s.__dict__ for s in self.ours], "base": [s.__dict__ for s in self.base]}


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass  # exited meanwhile
    return out


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE // 1024
    except (OSError, IndexError, ValueError):
        return 0


class _TreeSampler(threading.Thread):
    """Sums the RSS of every descendant of `root` (not `root`, GNU time itself) every 20 ms."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            stack, total = _children(self.root), 0
            while stack:
                pid = stack.pop()
                total += _rss_kb(pid)
                stack += _children(pid)
            self.peak_kb = max(self.peak_kb, total)


def _busy_cpu() -> float:
    """CPU seconds the whole machine has been busy (steal included) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    guest = sum(fields[8:10])  # already counted in user and nice
    return (sum(fields) - idle - guest) / _TICK


class CommandFailed(SystemExit):
    """A timed command exited non-zero; `summary` is the last line of its stderr. A subclass
    of SystemExit, so a caller that does not handle it still stops with the message."""

    def __init__(self, cmd: list[str] | str, code: int, stderr: str) -> None:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        self.summary = f"exit {code}: {lines[-1].strip() if lines else ''}"[:200]
        super().__init__(f"failed ({code}): {cmd}\n{stderr}")


def timed(cmd: list[str] | str, env: dict[str, str] | None = None) -> Sample:
    """Run a command (a shell string runs under bash); its wall seconds and peak memory.

    GNU time is a small parent: a child forked straight from this process would start its
    high-water mark at this process's own size.
    """
    argv = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
    with tempfile.NamedTemporaryFile("r") as rss, tempfile.TemporaryFile() as err:
        busy = _busy_cpu()
        start = time.perf_counter()
        # cwd "/": `python3 -m` puts the working directory first on sys.path, which would
        # shadow the incstore chosen through PYTHONPATH (see run.py --incstore-ref)
        proc = subprocess.Popen([GNU_TIME, "-o", rss.name, "-f", "%M %U %S", *argv],
                                stdout=subprocess.DEVNULL, stderr=err, cwd="/",
                                env={**os.environ, **(env or {})})
        sampler = _TreeSampler(proc.pid)
        sampler.start()
        code = proc.wait()
        elapsed = time.perf_counter() - start
        busy = _busy_cpu() - busy
        sampler.done.set()
        sampler.join()
        if code != 0:
            err.seek(0)
            raise CommandFailed(cmd, code, err.read().decode(errors="replace"))
        peak_kb, user, system = rss.read().split()[-3:]
        # GNU time counts the tree's own CPU; the sampler thread's few ms stay "foreign"
        foreign = max(0.0, busy - float(user) - float(system))
        return Sample(elapsed, int(peak_kb), sampler.peak_kb, round(foreign, 3))


def du(path: Path) -> int:
    """Bytes of the regular files under `path` (hard links counted once)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen and not os.path.islink(
                    os.path.join(dirpath, name)):
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def wipe(path: Path) -> None:
    remove_tree(path)


def wait_quiet(max_wait: float = QUIET_WAIT) -> float:
    """Wait (at most `max_wait` s) until the machine has been nearly idle for a second, since
    other sessions may share it; returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        busy = _busy_cpu()
        time.sleep(1.0)
        if _busy_cpu() - busy < 0.10:
            break
    return time.perf_counter() - start


def pair(row: Row, rep: int, ours: list[str], base: str,
         reset: Callable[[], object] | None = None, retry: bool = True) -> None:
    """Time incstore and the baseline back to back, alternating which goes first, so a slow
    patch of the disk does not always fall on the same side.

    The machine is shared: when other processes took more than DISTURBED of a core during
    either run, the pair is run again (after `reset`, which puts both sides back in the
    scenario's starting state), up to TRIES times; the quietest attempt is kept. Scenarios
    whose state cannot be reset pass `retry=False`.
    """
    order = [0, 1] if rep % 2 == 0 else [1, 0]
    best: list[Sample] | None = None
    for attempt in range(TRIES if retry else 1):
        if reset is not None and attempt > 0:
            reset()
        wait_quiet()
        got: list[Sample] = [Sample(0, 0), Sample(0, 0)]
        for side in order:
            os.sync()
            got[side] = timed(ours if side == 0 else base)
        if best is None or sum(s.foreign_cpu for s in got) < sum(s.foreign_cpu for s in best):
            best = got
        if not any(s.disturbed for s in got):
            break
        row.retries += 1
    assert best is not None
    row.ours.append(best[0])
    row.base.append(best[1])


def tar_create(prefix: Path, archive: Path) -> str:
    """The monolithic cache's save: the whole store and DB, one zstd stream on all cores."""
    return f"tar -C {prefix} -c gnu/store var/guix/db | zstd -q -T0 -3 -f -o {archive}"


def tar_extract(archive: Path, dest: Path) -> str:
    return f"mkdir -p {dest} && zstd -q -d -c {archive} | tar -C {dest} -x"


def table(rows: list[Row], with_items: bool = False) -> str:
    """A Markdown table of medians, ratios (of the medians, and of each pair), bytes and
    peak memory."""
    head = ("| scenario | where | incstore s | baseline s | ratio | ratio per run | "
            "incstore bytes | baseline bytes | incstore peak MB | baseline peak MB | "
            "others' CPU |")
    ncol = 11
    if with_items:
        head = "| items " + head
        ncol += 1
    lines = [head, "|" + "---|" * ncol]
    for r in rows:
        if r.failed:
            first = f"| {r.items:,} " if with_items else ""
            lines.append(f"{first}| {r.scenario} | {r.where} | failed: {r.failed} |"
                         + " |" * (ncol - (4 if with_items else 3)))
            continue
        ours = Row.med(r.ours)
        if r.base:
            base_s, ratio = f"{Row.med(r.base):.2f}", f"{r.ratio:.3f}"
            per_run = " ".join(f"{x:.3g}" for x in r.pair_ratios)
            base_peak = f"{Row.peak(r.base):.0f}"
        else:
            base_s = ratio = per_run = base_peak = "-"
        first = f"| {r.items:,} " if with_items else ""
        lines.append(f"{first}| {r.scenario} | {r.where} | {ours:.2f} | {base_s} | {ratio} | "
                     f"{per_run} | {r.ours_bytes:,} | {r.base_bytes:,} | {Row.peak(r.ours):.0f} | "
                     f"{base_peak} | {max(Row.foreign(r.ours), Row.foreign(r.base)):.0%}"
                     f"{f' ({r.retries} retried)' if r.retries else ''} |")
    return "\n".join(lines)
