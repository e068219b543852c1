"""Many small items: incstore against the monolithic cache on Guix-shaped stores of growing
item count (bench/guixstore.py), and on the 2,076-item reference store.

For each store, five scenarios, each timed for incstore (its CLI) and for the baseline
(`tar | zstd -T0 -3`, `zstd -d | tar -x`), median of `reps` runs alternating which goes first:

- cold save: an empty chunk store / a new archive, on the disk and again in tmpfs;
- save, nothing new: the chunk store already holds every item / the archive is made again;
- restore, empty store: into an empty prefix (tmpfs by default) / the archive extracted;
- restore, 90% present: 10% of the items (leaves first, so the rest stays closed) deleted and
  unregistered, then restored / the same items deleted from the baseline's tree, then the
  whole archive extracted over it, which is all a monolithic cache can do;
- no-op restore: everything present / the archive extracted again over the full tree.

Bytes: for saves, chunk and manifest bytes written / the archive's size; for restores, file
bytes written into the store by incstore (the missing items) / by the baseline (everything).

Disk rows (saves, and restores placed on "disk") are timed on the `Disk` the caller gives
(bench/disk.py): an ext4 image on a loop device that run.py makes for the run, whose rows say
`loop`, or a plain directory, whose rows name it. Each disk pair runs back to back on it, so
the "ratio per run" column holds ratios taken under the same disk conditions.

`growth` writes bench/out/growth.md, growth.csv and (with matplotlib) growth.png; `reference`
writes bench/out/small-items.md and small-items.csv.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import daemondb, guixstore
from bench.disk import Disk
from bench.guixstore import StoreSpec, Summary
from bench.measure import (
    INCSTORE,
    CommandFailed,
    Row,
    Sample,
    du,
    pair,
    table,
    tar_create,
    tar_extract,
    wipe,
)

OUT = guixstore.OUT
SCENARIOS = ("cold save", "save, nothing new", "restore, empty store", "restore, 90% present",
             "no-op restore")
REFERENCE_ITEMS = 2076


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def store_rows(prefix: Path, summary: Summary, where: Iterable[str], reps: int, disk: Disk,
               shm_dir: Path) -> list[Row]:
    """The five scenarios on the (read-only) store under `prefix`; `where` holds "shm"
    and/or "disk", and disk rows are labelled `disk.where`."""
    db_path = daemondb.db_path(prefix)
    work = Path(tempfile.mkdtemp(prefix="incstore-growth-", dir=disk.root))
    disk_label = disk.where

    def label(place: str) -> str:
        return disk_label if place == "disk" else place

    rows: list[Row] = []
    n = summary.items

    def done(row: Row) -> Row:
        rows.append(row)
        if row.failed:
            log(f"  {n:>6} items  {row.scenario:34} {row.where:4}  FAILED {row.failed}")
            return row
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else "-"
        log(f"  {n:>6} items  {row.scenario:34} {row.where:4}  incstore "
            f"{Row.med(row.ours):7.2f} s  baseline {Row.med(row.base):7.2f} s  ratio {ratio}")
        return row

    def give_up(row: Row, error: CommandFailed, rest: list[tuple[str, str]]) -> None:
        """A command failed (a finding, not a bench error): record it, and the scenarios that
        needed its result as not run."""
        row.failed, row.ours, row.base = error.summary, [], []
        done(row)
        for scenario, place in rest:
            done(Row(scenario, place, items=n, failed=f"not run ({row.scenario} failed)"))

    restores = [(s, label(p)) for p in where for s in SCENARIOS[2:]]
    try:
        cache, manifest, archive = work / "cache", work / "m.json", work / "store.tar.zst"
        save = [*INCSTORE, "save", "--db", str(db_path), "--prefix", str(prefix),
                "--cache", str(cache), "--manifest", str(manifest)]
        row = Row("cold save", disk_label, items=n)
        try:
            for rep in range(reps):
                wipe(cache)
                pair(row, rep, save, tar_create(prefix, archive), reset=lambda: wipe(cache))
        except CommandFailed as e:
            give_up(row, e, [("save, nothing new", disk_label), *restores])
            return rows
        row.ours_bytes, row.base_bytes = du(cache) + du(manifest), du(archive)
        done(row)
        if "shm" in where:  # the same save into tmpfs: the CPU's share, without the disk's
            row = Row("cold save", "shm", items=n)
            spool = Path(tempfile.mkdtemp(prefix="incstore-growth-", dir=shm_dir))
            shm_cache = spool / "cache"
            try:
                shm_save = [*save[:-4], "--cache", str(shm_cache),
                            "--manifest", str(spool / "m.json")]
                for rep in range(reps):
                    wipe(shm_cache)
                    pair(row, rep, shm_save, tar_create(prefix, spool / "store.tar.zst"),
                         reset=lambda: wipe(shm_cache))
                row.ours_bytes, row.base_bytes = du(shm_cache), du(spool / "store.tar.zst")
                done(row)
            except CommandFailed as e:
                give_up(row, e, [])
            finally:
                wipe(spool)

        row = Row("save, nothing new", disk_label, items=n)
        try:
            for rep in range(reps):
                before = du(cache)
                pair(row, rep, save, tar_create(prefix, archive))
                row.ours_bytes = du(cache) - before + du(manifest)
            row.base_bytes = du(archive)
            done(row)
        except CommandFailed as e:
            give_up(row, e, [])

        for place in where:
            root = Path(tempfile.mkdtemp(prefix="incstore-growth-",
                                         dir=shm_dir if place == "shm" else disk.root))
            dst, base_dst = root / "dst", root / "base"
            restore = [*INCSTORE, "restore", "--manifest", str(manifest), "--cache", str(cache),
                       "--prefix", str(dst)]
            try:
                row = Row("restore, empty store", label(place), items=n)

                def empty(dst: Path = dst, base_dst: Path = base_dst) -> None:
                    wipe(dst)
                    wipe(base_dst)

                try:
                    for rep in range(reps):
                        empty()
                        pair(row, rep, restore, tar_extract(archive, base_dst), reset=empty)
                except CommandFailed as e:
                    give_up(row, e, [(s, label(place)) for s in SCENARIOS[3:]])
                    continue
                row.ours_bytes, row.base_bytes = du(dst), du(base_dst)
                done(row)
                if place == "disk":
                    # by default both leave what they wrote in the page cache (incstore as
                    # the daemons do); this row times both durable: incstore --fsync (one
                    # syncfs before the DB names anything; incstores before it synced
                    # always) against a monolith followed by a sync of its file system
                    row = Row("restore, empty store, both durable", label(place), items=n)
                    durable = [*restore, *(["--fsync"] if _has_fsync() else [])]
                    try:
                        for rep in range(reps):
                            empty()
                            pair(row, rep, durable,
                                 f"{tar_extract(archive, base_dst)} && sync -f {base_dst}",
                                 reset=empty)
                        row.ours_bytes, row.base_bytes = du(dst), du(base_dst)
                        done(row)
                    except CommandFailed as e:
                        give_up(row, e, [])

                row = Row("restore, 90% present", label(place), items=n)

                def missing(dst: Path = dst, base_dst: Path = base_dst) -> int:
                    return daemondb.drop(dst, 0.10, mirrors=[base_dst]).file_bytes

                try:
                    for rep in range(reps):
                        row.ours_bytes = missing()
                        pair(row, rep, restore, tar_extract(archive, base_dst), reset=missing)
                    row.base_bytes = du(base_dst)
                    done(row)
                except CommandFailed as e:
                    give_up(row, e, [])

                row = Row("no-op restore", label(place), items=n)
                try:
                    for rep in range(reps):
                        pair(row, rep, restore, tar_extract(archive, base_dst))
                    row.base_bytes = du(base_dst)
                    done(row)
                except CommandFailed as e:
                    give_up(row, e, [])
            finally:
                wipe(root)
    finally:
        wipe(work)
    return rows


def _shape(summary: Summary) -> str:
    return f"- {summary.line()}"


def _write_csv(path: Path, rows: list[Row], shapes: dict[int, Summary]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["items", "nar_bytes", "files", "scenario", "where", "incstore_s",
                    "baseline_s", "ratio", "incstore_bytes", "baseline_bytes",
                    "incstore_peak_mb", "baseline_peak_mb", "incstore_samples_s",
                    "baseline_samples_s"])
        for r in rows:
            shape = shapes[r.items]
            if r.failed:
                w.writerow([r.items, shape.nar_bytes, shape.entries, r.scenario, r.where,
                            f"failed: {r.failed}"])
                continue
            w.writerow([r.items, shape.nar_bytes, shape.entries, r.scenario, r.where,
                        f"{Row.med(r.ours):.3f}", f"{Row.med(r.base):.3f}", f"{r.ratio:.4f}",
                        r.ours_bytes, r.base_bytes, f"{Row.peak(r.ours):.0f}",
                        f"{Row.peak(r.base):.0f}",
                        " ".join(f"{s.seconds:.3f}" for s in r.ours),
                        " ".join(f"{s.seconds:.3f}" for s in r.base)])


def plot(rows: list[Row], path: Path) -> bool:
    """Ratio and absolute time against item count, one line per scenario; False without
    matplotlib (a bench-only extra: the tables do not need it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install matplotlib==3.11.2): no growth.png")
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, scenario in enumerate(SCENARIOS):
        places = sorted({r.where for r in rows if r.scenario == scenario}, reverse=True)
        for place in places:  # shm first (solid), then disk (dash-dot) where both were timed
            pts = sorted(((r.items, r) for r in rows if r.scenario == scenario and
                          r.where == place and not r.failed), key=lambda p: p[0])
            if not pts:
                continue
            xs = [x for x, _ in pts]
            label = f"{scenario} ({place})"
            style = "-." if place != "shm" and len(places) > 1 else "-"
            left.plot(xs, [r.ratio for _, r in pts], style, marker="o", color=colours[i],
                      label=label)
            right.plot(xs, [Row.med(r.ours) for _, r in pts], style, marker="o",
                       color=colours[i], label=f"incstore: {label}")
            right.plot(xs, [Row.med(r.base) for _, r in pts], ":", marker="x",
                       color=colours[i], label=f"monolith: {label}")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set(xscale="log", yscale="log", xlabel="store items",
             ylabel="incstore / monolith (median wall time)",
             title="Ratio (below 1: incstore is faster)")
    right.set(xscale="log", yscale="log", xlabel="store items", ylabel="seconds (median of runs)",
              title="Absolute time (solid: incstore, dotted: tar | zstd)")
    left.legend(fontsize=8)
    right.legend(fontsize=6, ncol=2, loc="best")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("incstore vs tar | zstd as the item count grows (same large items, "
                 "more small ones)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _report(title: str, rows: list[Row], shapes: dict[int, Summary], note: str) -> str:
    return "\n".join([f"# {title}", "", "Stores:", *(_shape(s) for s in shapes.values()), "",
                      note, "", table(rows, with_items=True), ""])


def _row(doc: dict[str, Any]) -> Row:
    samples = {k: [Sample(**s) for s in doc[k]] for k in ("ours", "base")}
    return Row(**{**doc, **samples})


def _previous(timed: str, sizes: list[int]) -> tuple[list[Row], dict[int, Summary]]:
    """Rows of earlier runs of the same incstore at other sizes, so that a curve can be
    measured a few sizes at a time (`--sizes 50000` later adds to `--sizes 100,1000`)."""
    path = OUT / "growth.json"
    if not path.exists():
        return [], {}
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("incstore") != timed:
            return [], {}
        rows = [_row(r) for r in doc["rows"] if r["items"] not in sizes]
        shapes = {int(k): Summary(**v) for k, v in doc["stores"].items()
                  if int(k) not in sizes}
        return rows, shapes
    except (KeyError, TypeError, ValueError):
        return [], {}


def growth(sizes: list[int], reps: int, where: list[str], disk: Disk, shm_dir: Path,
           seed: int = 7, timed: str = "") -> list[Row]:
    """The growth curve at `sizes`, merged with earlier runs of the same incstore (`timed`
    names it) at other sizes."""
    OUT.mkdir(parents=True, exist_ok=True)
    rows, shapes = _previous(timed, sizes)
    for n in sizes:
        log(f"growth: building or reusing the {n:,}-item store ...")
        prefix, summary = guixstore.cached(StoreSpec(n, seed))
        log(f"  {summary.line()}")
        shapes[summary.items] = summary
        rows += store_rows(prefix, summary, where, reps, disk, shm_dir)
        rows.sort(key=lambda r: r.items)  # stable: scenario order kept within a size
        shapes = dict(sorted(shapes.items()))
        # rewrite the outputs after every size, so a long run leaves what it measured so far
        note = (f"incstore: {timed}. Median of {reps} runs, alternating which goes first; "
                f"restores into {', '.join(where)}; cold saves on the disk and in shm, "
                f"saves with nothing new on the disk. Disk rows: {disk.note}.")
        (OUT / "growth.md").write_text(_report("Growth curve", rows, shapes, note))
        _write_csv(OUT / "growth.csv", rows, shapes)
        (OUT / "growth.json").write_text(json.dumps(
            {"incstore": timed, "stores": {k: asdict(v) for k, v in shapes.items()},
             "rows": [r.to_json() for r in rows]}, indent=1))
        plot(rows, OUT / "growth.png")
    return rows


def reference(reps: int, where: list[str], disk: Disk, shm_dir: Path,
              seed: int = 7, timed: str = "") -> list[Row]:
    """The 2,076-item store shaped like the one a user measured."""
    OUT.mkdir(parents=True, exist_ok=True)
    log(f"small items: building or reusing the {REFERENCE_ITEMS:,}-item reference store ...")
    prefix, summary = guixstore.cached(StoreSpec(REFERENCE_ITEMS, seed))
    log(f"  {summary.line()}")
    rows = store_rows(prefix, summary, where, reps, disk, shm_dir)
    shapes = {summary.items: summary}
    note = (f"incstore: {timed}. Median of {reps} runs, alternating which goes first. "
            f"Disk rows: {disk.note}.")
    (OUT / "small-items.md").write_text(_report("2,076-item reference store", rows, shapes,
                                                note))
    _write_csv(OUT / "small-items.csv", rows, shapes)
    return rows


def _has_fsync() -> bool:
    """Whether the incstore being timed has --fsync (it always synced before it had)."""
    out = subprocess.run([*INCSTORE, "restore", "--help"], capture_output=True, text=True,
                         cwd="/", check=False).stdout
    return "--fsync" in out
