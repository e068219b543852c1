"""Benchmark: incstore side by side with the monolithic `tar | zstd` cache, in one run.

    python3 bench/run.py [--mb 500] [--items 100] [--reps 3] [--where disk,shm] [--nix] [--s3]

Builds a realistic Guix store (bench/realstore.py), then times each scenario for incstore and for
the baseline (`tar -c gnu/store var/guix/db | zstd -T0 -3`, `zstd -d | tar -x`), several times,
and prints one table: median seconds, ratio incstore/baseline, bytes written, peak memory.
Restores run into a tmpfs (/dev/shm) and on disk, since disk writes here vary up to 10x between
runs; compare ratios from one run. With --nix, `nix copy` to and from a file:// binary cache of
the same items (as a Nix store) is timed as a second peer.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import realstore
from incstore import db
from incstore.store import Store, remove_tree

INCSTORE = [sys.executable, "-m", "incstore"]


@dataclass
class Sample:
    seconds: float
    peak_kb: int


@dataclass
class Row:
    scenario: str
    where: str
    ours: list[Sample] = field(default_factory=list)
    base: list[Sample] = field(default_factory=list)
    ours_bytes: int = 0
    base_bytes: int = 0

    @staticmethod
    def med(samples: list[Sample]) -> float:
        return statistics.median(s.seconds for s in samples)

    @staticmethod
    def peak(samples: list[Sample]) -> float:
        return max(s.peak_kb for s in samples) / 1024


GNU_TIME = shutil.which("time") or "/usr/bin/time"


def timed(cmd: list[str] | str) -> Sample:
    """Run a command, return wall seconds and the peak RSS of it and its children.

    The RSS comes from GNU time, a small parent: a child forked straight from this process
    would start its high-water mark at this process's own size.
    """
    argv = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        proc = subprocess.run([GNU_TIME, "-o", rss.name, "-f", "%M", *argv],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"failed: {cmd}\n{proc.stderr.decode()}")
        return Sample(elapsed, int(rss.read().split()[-1]))


def du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file())


def wipe(path: Path) -> None:
    if path.exists():
        remove_tree(path)


def sync() -> None:
    os.sync()


def drop_leaves(prefix: Path, fraction: float) -> int:
    """Make `fraction` of a restored store's items missing again (leaves, so it stays closed)."""
    store = Store(prefix, db.GUIX)
    infos = db.read_snapshot(store.default_db).infos
    referenced = {r for i in infos.values() for r in i.references if r != i.path}
    leaves = sorted(p for p in infos if p not in referenced)
    victims = leaves[: max(1, int(len(infos) * fraction))]
    conn = sqlite3.connect(store.default_db)
    with conn:
        conn.executemany("delete from ValidPaths where path = ?", [(p,) for p in victims])
    conn.close()
    for path in victims:
        remove_tree(store.physical(path))
    return sum(infos[p].nar_size for p in victims)


def pair(row: Row, rep: int, ours: list[str], base: str) -> None:
    """Time incstore and the baseline back to back, alternating which goes first, so a slow
    patch of the disk does not always fall on the same side."""
    runs = [(row.ours, ours), (row.base, base)]
    for samples, cmd in runs if rep % 2 == 0 else runs[::-1]:
        sync()
        samples.append(timed(cmd))


def tar_create(prefix: Path, archive: Path) -> str:
    return (f"tar -C {prefix} -c gnu/store var/guix/db | zstd -q -T0 -3 -f -o {archive}")


def tar_extract(archive: Path, dest: Path) -> str:
    return f"mkdir -p {dest} && zstd -q -d -c {archive} | tar -C {dest} -x"


def bench(args: argparse.Namespace) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="incstore-bench-", dir=args.disk_dir))
    rows: list[Row] = []
    try:
        src = work / "src"
        print(f"building the bench store in {src} ...", file=sys.stderr)
        infos = realstore.build(src, args.mb << 20, args.items)
        nar_bytes = sum(i.nar_size for i in infos)
        files = sum(1 for _ in (src / "gnu/store").rglob("*"))
        print(f"{len(infos)} items, {nar_bytes / 2**20:.0f} MiB of NAR, {files} files",
              file=sys.stderr)
        db_path = Store(src, db.GUIX).default_db
        cache = work / "cache"
        archive = work / "store.tar.zst"

        def save(manifest: Path) -> list[str]:
            return [*INCSTORE, "save", "--db", str(db_path), "--prefix", str(src),
                    "--cache", str(cache), "--manifest", str(manifest)]

        # 1. cold save
        row = Row("cold save", "disk")
        for rep in range(args.reps):
            wipe(cache)
            pair(row, rep, save(work / "m.json"), tar_create(src, archive))
        row.ours_bytes, row.base_bytes = du(cache) + du(work / "m.json"), du(archive)
        rows.append(row)

        # 2. warm save after a package update: 3 new items
        row = Row("warm save (+3 items)", "disk")
        for rep in range(args.reps):
            realstore.add_update(src, 3, seed=1000 + rep)
            before = du(cache)
            pair(row, rep, save(work / f"m{rep}.json"), tar_create(src, archive))
            row.ours_bytes = du(cache) - before + du(work / f"m{rep}.json")
            row.base_bytes = du(archive)
        rows.append(row)
        manifest = work / f"m{args.reps - 1}.json"

        for where in args.where:
            root = Path(tempfile.mkdtemp(prefix="incstore-bench-", dir=args.shm_dir
                                         if where == "shm" else args.disk_dir))
            dst, base_dst = root / "dst", root / "base"

            restore_cmd = [*INCSTORE, "restore", "--manifest", str(manifest), "--cache",
                           str(cache), "--prefix", str(dst)]

            try:
                # 3. restore into an empty store
                row = Row("restore, empty store", where)
                for rep in range(args.reps):
                    wipe(dst)
                    wipe(base_dst)
                    pair(row, rep, restore_cmd, tar_extract(archive, base_dst))
                row.ours_bytes = row.base_bytes = du(dst)
                rows.append(row)
                # 4. restore into a store that holds 90% of the items
                row = Row("restore, 90% present", where)
                for rep in range(args.reps):
                    row.ours_bytes = drop_leaves(dst, 0.10)
                    pair(row, rep, restore_cmd, tar_extract(archive, base_dst))
                row.base_bytes = du(base_dst)
                rows.append(row)
                # 5. no-op restore: everything present
                row = Row("no-op restore", where)
                for rep in range(args.reps):
                    pair(row, rep, restore_cmd, tar_extract(archive, base_dst))
                row.base_bytes = du(base_dst)
                rows.append(row)
            finally:
                wipe(root)
        if args.nix:
            rows += nix_peer(work, src, args)
        if args.s3:
            rows += s3_scenarios(work, src, archive, args)
    finally:
        if not args.keep:
            wipe(work)
    return rows


def nix_peer(work: Path, src: Path, args: argparse.Namespace) -> list[Row]:
    """`nix copy` to and from a zstd file:// cache, on a Nix store with the same trees."""
    nix_root = work / "nixsrc"
    names = sorted(p.name for p in (src / "gnu/store").iterdir())
    xp = ["--extra-experimental-features", "nix-command"]
    paths = []
    staging = work / "staging"
    staging.mkdir()
    for name in names:
        item = src / "gnu/store" / name
        if name.endswith(".drv"):  # `nix-store --add` refuses names ending in .drv
            item = staging / name[33:].removesuffix(".drv")
            shutil.copy(src / "gnu/store" / name, item)
        out = subprocess.run(["nix-store", "--store", str(nix_root), "--add", str(item)],
                             capture_output=True, text=True, check=True)
        paths.append(out.stdout.strip())
    cache = work / "nixcache"
    save = Row("nix copy --to file:// (cold)", "disk")
    restore = Row("nix copy --from file://", "disk")
    for _ in range(args.reps):
        wipe(cache)
        save.ours.append(timed(["nix", *xp, "copy", "--from", str(nix_root), "--to",
                                f"file://{cache}?compression=zstd", *paths]))
        dst = work / "nixdst"
        wipe(dst)
        restore.ours.append(timed(["nix", *xp, "copy", "--no-check-sigs", "--from",
                                   f"file://{cache}", "--to", str(dst), *paths]))
    save.ours_bytes = du(cache)
    return [save, restore]


def s3_scenarios(work: Path, src: Path, archive: Path, args: argparse.Namespace) -> list[Row]:
    """Save and restore through a local S3 server (localbucket, data on disk, loopback); the
    baseline uploads and downloads its one archive through the same server."""
    port = 9000 + os.getpid() % 1000
    data = work / "s3data"
    (data / "bench").mkdir(parents=True)  # localbucket: a bucket is a folder
    server = subprocess.Popen([sys.executable, "-m", "localbucket", "--port", str(port), str(data)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    os.environ.update(env)
    time.sleep(1)
    copy = [sys.executable, str(Path(__file__).with_name("s3copy.py"))]
    db_path = Store(src, db.GUIX).default_db
    rows = [Row("S3 cold save", "disk"), Row("S3 restore, empty store", "shm"),
            Row("S3 restore, 90% present", "shm")]
    dst = Path(tempfile.mkdtemp(prefix="incstore-bench-s3-", dir=args.shm_dir))
    base_dst = dst.with_name(dst.name + "-base")
    try:
        for rep in range(args.reps):
            cache = f"s3://bench/run{rep}"
            save_cmd = [*INCSTORE, "save", "--db", str(db_path), "--prefix", str(src),
                        "--cache", cache, "--name", "b"]
            base_save = (f"{tar_create(src, archive)} && {shlex.join(copy)} put {archive} "
                         f"s3://bench/archive{rep}.tar.zst")
            pair(rows[0], rep, save_cmd, base_save)
            restore_cmd = [*INCSTORE, "restore", "--name", "b", "--cache", cache,
                           "--prefix", str(dst / "r")]
            base_restore = (f"{shlex.join(copy)} get s3://bench/archive{rep}.tar.zst "
                            f"{dst}/a.tar.zst && {tar_extract(dst / 'a.tar.zst', base_dst)}")
            wipe(dst / "r")
            wipe(base_dst)
            pair(rows[1], rep, restore_cmd, base_restore)
            rows[2].ours_bytes = drop_leaves(dst / "r", 0.10)
            wipe(base_dst)
            pair(rows[2], rep, restore_cmd, base_restore)
        rows[0].ours_bytes = du(data / "bench" / f"run{args.reps - 1}")
        rows[0].base_bytes = du(archive)
        rows[1].ours_bytes = rows[1].base_bytes = du(dst / "r")
        rows[2].base_bytes = du(base_dst)
    finally:
        server.kill()
        wipe(dst)
        wipe(base_dst)
    return rows


def table(rows: list[Row]) -> str:
    head = ("| scenario | where | incstore s | baseline s | ratio | incstore bytes | "
            "baseline bytes | incstore peak MB | baseline peak MB |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ours = Row.med(r.ours)
        if r.base:
            base, ratio = Row.med(r.base), f"{Row.med(r.ours) / Row.med(r.base):.3f}"
            base_s, base_peak = f"{base:.2f}", f"{Row.peak(r.base):.0f}"
        else:
            base_s = ratio = base_peak = "-"
        lines.append(f"| {r.scenario} | {r.where} | {ours:.2f} | {base_s} | {ratio} | "
                     f"{r.ours_bytes:,} | {r.base_bytes:,} | {Row.peak(r.ours):.0f} | "
                     f"{base_peak} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=500, help="target store size in MiB")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--where", default="shm,disk", type=lambda s: s.split(","))
    parser.add_argument("--disk-dir", default="/var/tmp")
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument("--nix", action="store_true", help="add nix copy as a second peer")
    parser.add_argument("--s3", action="store_true",
                        help="add save and restore through a local S3 server (localbucket)")
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if shutil.which("zstd") is None or shutil.which("tar") is None:
        raise SystemExit("bench needs tar and zstd (apt-get install zstd)")
    if args.nix and shutil.which("nix") is None:
        raise SystemExit("--nix needs Debian's nix-bin")
    # as `pip install` does: byte-compile, so startup is not charged for compiling
    subprocess.run([sys.executable, "-m", "compileall", "-q",
                    str(Path(__file__).resolve().parent.parent / "incstore")], check=True)
    rows = bench(args)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"ours": [s.__dict__ for s in r.ours],
                                                       "base": [s.__dict__ for s in r.base]}
                                         for r in rows], indent=1))


if __name__ == "__main__":
    main()
