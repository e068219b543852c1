"""Benchmark: incstore side by side with the monolithic `tar | zstd` cache, in one run.

    python3 bench/run.py [--classic] [--growth [--sizes 100,1000,10000,50000]] [--small-items]
                         [--manifest-scale [--manifest-items 200000]] [--reps 3]
                         [--incstore-ref REF] [--nix] [--s3] [--mb 500] [--items 100]
                         [--disk-dir /var/tmp] [--disk-image-mb N]

Each scenario is timed for incstore (only ever through its CLI, `python3 -m incstore`) and for
the baseline (`tar -c gnu/store var/guix/db | zstd -T0 -3`, `zstd -d | tar -x`), several times,
alternating which goes first; tables show median seconds, the ratio incstore/baseline, bytes
written and peak memory (of the whole process tree: see bench/measure.py).

Parts (with no part flag: --classic and --growth at the default sizes). Durations on this
2-core machine, stores already cached under bench/out/stores/ (building them once takes 30 s
for 2,076 items, 13 s for 10,000, 61 s for 50,000); "busy" is what they took while other
sessions' test suites kept 1 to 1.5 of the 2 cores busy (every pair then waits for a quiet
second and is retried once), "quiet" is the sum of the timed runs plus set-up:

--classic          The README's scenarios on a realistic store of about 100 large items built
                   from this machine's files (bench/realstore.py): cold save, warm save of 3
                   new items, restore into an empty store, 90% present, no-op, each into tmpfs
                   and on disk (--where). About 5 minutes quiet; --nix and --s3 add peers.
--growth           The growth curve on Guix-shaped stores (bench/guixstore.py) of --sizes items
                   (default 100,1000,10000: about 10 minutes quiet with restores into tmpfs
                   only, 27 busy, twice that with the disk rows; 50000 adds about 20 quiet, a
                   third of that with --reps 1): the same 31 large items (544 MB), the rest
                   small. Scenarios: cold save, save with nothing new, restore into an empty
                   store, 90% present, no-op (restores into tmpfs and on the disk, see below;
                   --growth-where shm for tmpfs only).
                   Writes bench/out/growth.{md,csv,json} and, with matplotlib (pip install
                   matplotlib==3.11.2), bench/out/growth.png; a later run of the same incstore
                   at other --sizes adds its points to the curve.
--small-items      The same five scenarios on the 2,076-item reference store shaped like a
                   user's real one (563 MB of NAR, 32,000 files), restores into tmpfs and on
                   disk. About 8 minutes quiet, 37 busy. Writes bench/out/small-items.{md,csv}.
--manifest-scale   A synthetic --manifest-items manifest (default 200,000) with its chunk
                   store: times `restore --dry-run` into an empty prefix, `check` and `stats`
                   (bench/manifestscale.py). About 4 minutes, plus 1 to synthesise it once.

The disk (--small-items and --growth). Their disk rows (saves, and restores on "disk") are
timed on an ext4 image that the run makes in --disk-dir (default /var/tmp), attaches to a loop
device and mounts without `discard`, sized from the stores it will hold (--disk-image-mb N
to choose), used by incstore and the monolith alike, and unmounts, detaches and deletes at the
end, also on an error or Ctrl-C (bench/disk.py). Their rows say `loop`. This machine's root
file system is mounted with `discard`, which makes timings there swing up to 10x. Without
root or loop devices the disk rows fall back to --disk-dir itself (with a warning), and say
its path instead; --disk-image-mb 0 asks for that. --classic always writes in --disk-dir,
and its disk rows say so.

bench/profile.py profiles the per-item work (import time, cProfile in every thread, strace);
bench/syscalls.py counts system calls per item, which do not depend on the disk's mood.

--incstore-ref REF times the incstore of a git revision (exported to bench/out/src-<sha>/)
instead of the working tree, so a run is not disturbed by edits in progress.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import daemondb, disk, guixstore, realstore  # noqa: E402
from bench.measure import (  # noqa: E402
    INCSTORE,
    Row,
    du,
    pair,
    table,
    tar_create,
    tar_extract,
    timed,
    wipe,
)


def bench(args: argparse.Namespace) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="incstore-bench-", dir=args.disk_dir))
    rows: list[Row] = []
    # not the bench's image (its store is built in place, of a size known only once built):
    # the rows name the directory they were timed in
    on_disk = disk.directory(args.disk_dir).where
    try:
        src = work / "src"
        print(f"building the bench store in {src} ...", file=sys.stderr)
        infos = realstore.build(src, args.mb << 20, args.items)
        nar_bytes = sum(i.nar_size for i in infos)
        files = sum(1 for _ in (src / "gnu/store").rglob("*"))
        print(f"{len(infos)} items, {nar_bytes / 2**20:.0f} MiB of NAR, {files} files",
              file=sys.stderr)
        db_path = daemondb.db_path(src)
        cache = work / "cache"
        archive = work / "store.tar.zst"

        def save(manifest: Path) -> list[str]:
            return [*INCSTORE, "save", "--db", str(db_path), "--prefix", str(src),
                    "--cache", str(cache), "--manifest", str(manifest)]

        # 1. cold save
        row = Row("cold save", on_disk)
        for rep in range(args.reps):
            wipe(cache)
            pair(row, rep, save(work / "m.json"), tar_create(src, archive),
                 reset=lambda: wipe(cache))
        row.ours_bytes, row.base_bytes = du(cache) + du(work / "m.json"), du(archive)
        rows.append(row)

        # 2. warm save after a package update: 3 new items
        row = Row("warm save (+3 items)", on_disk)
        for rep in range(args.reps):
            realstore.add_update(src, 3, seed=1000 + rep)
            before = du(cache)
            pair(row, rep, save(work / f"m{rep}.json"), tar_create(src, archive), retry=False)
            row.ours_bytes = du(cache) - before + du(work / f"m{rep}.json")
            row.base_bytes = du(archive)
        rows.append(row)
        manifest = work / f"m{args.reps - 1}.json"

        for place in args.where:
            root = Path(tempfile.mkdtemp(prefix="incstore-bench-", dir=args.shm_dir
                                         if place == "shm" else args.disk_dir))
            where = on_disk if place == "disk" else place
            dst, base_dst = root / "dst", root / "base"

            restore_cmd = [*INCSTORE, "restore", "--manifest", str(manifest), "--cache",
                           str(cache), "--prefix", str(dst)]

            def empty(dst: Path = dst, base_dst: Path = base_dst) -> None:
                wipe(dst)
                wipe(base_dst)

            try:
                # 3. restore into an empty store
                row = Row("restore, empty store", where)
                for rep in range(args.reps):
                    empty()
                    pair(row, rep, restore_cmd, tar_extract(archive, base_dst), reset=empty)
                row.ours_bytes = row.base_bytes = du(dst)
                rows.append(row)
                # 4. restore into a store that holds 90% of the items
                row = Row("restore, 90% present", where)
                for rep in range(args.reps):
                    row.ours_bytes = daemondb.drop(dst, 0.10).nar_bytes
                    pair(row, rep, restore_cmd, tar_extract(archive, base_dst), retry=False)
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
    on_disk = disk.directory(args.disk_dir).where
    save = Row("nix copy --to file:// (cold)", on_disk)
    restore = Row("nix copy --from file://", on_disk)
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
    db_path = daemondb.db_path(src)
    rows = [Row("S3 cold save", disk.directory(args.disk_dir).where),
            Row("S3 restore, empty store", "shm"),
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
            pair(rows[0], rep, save_cmd, base_save, retry=False)
            restore_cmd = [*INCSTORE, "restore", "--name", "b", "--cache", cache,
                           "--prefix", str(dst / "r")]
            base_restore = (f"{shlex.join(copy)} get s3://bench/archive{rep}.tar.zst "
                            f"{dst}/a.tar.zst && {tar_extract(dst / 'a.tar.zst', base_dst)}")
            wipe(dst / "r")
            wipe(base_dst)
            pair(rows[1], rep, restore_cmd, base_restore, retry=False)
            rows[2].ours_bytes = daemondb.drop(dst / "r", 0.10).nar_bytes
            wipe(base_dst)
            pair(rows[2], rep, restore_cmd, base_restore, retry=False)
        rows[0].ours_bytes = du(data / "bench" / f"run{args.reps - 1}")
        rows[0].base_bytes = du(archive)
        rows[1].ours_bytes = rows[1].base_bytes = du(dst / "r")
        rows[2].base_bytes = du(base_dst)
    finally:
        server.kill()
        wipe(dst)
        wipe(base_dst)
    return rows


def use_incstore(ref: str | None) -> str:
    """Make every timed `python3 -m incstore` run the working tree's incstore, or that of git
    revision `ref` (exported once to bench/out/src-<sha>/); returns what is timed."""
    source = ROOT
    label = "working tree"
    if ref is not None:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                             capture_output=True, text=True, check=True).stdout.strip()
        source = ROOT / "bench" / "out" / f"src-{sha[:12]}"
        if not (source / "incstore" / "schema").is_dir():
            tmp = source.with_name(source.name + ".tmp")
            wipe(tmp)
            tmp.mkdir(parents=True)
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "incstore",
                                      "schema"], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-C", str(tmp), "-x"], input=archive, check=True)
            # the installed package maps incstore.schema to schema/: do the same by copying
            shutil.copytree(tmp / "schema", tmp / "incstore" / "schema")
            wipe(source)
            os.rename(tmp, source)
        label = f"{ref} ({sha[:12]})"
    # the timed processes (and the manifest canary) import incstore from here first
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(source), *filter(None, [os.environ.get("PYTHONPATH")])])
    # as `pip install` does: byte-compile, so startup is not charged for compiling
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(source / "incstore")],
                   check=True)
    found = subprocess.run([*INCSTORE, "--version"], capture_output=True, text=True,
                           cwd="/", check=True).stdout.strip()
    where = subprocess.run([sys.executable, "-c", "import incstore; print(incstore.__file__)"],
                           capture_output=True, text=True, cwd="/", check=True).stdout.strip()
    if not where.startswith(str(source)):
        raise SystemExit(f"the timed incstore is {where}, not the one in {source}")
    if ref is None:  # results name the commit, not where this checkout happens to be
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "incstore",
                                "schema"], capture_output=True, text=True, check=False).stdout
        label = f"commit {head or 'unknown'}" + (" with uncommitted changes" if dirty else "")
    return f"{found}, {label}"


def _sizes(text: str) -> list[int]:
    return sorted({int(s.replace("_", "")) for s in text.split(",") if s.strip()})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="See the module docstring (bench/run.py) for "
        "what each part measures and how long it takes.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    part = parser.add_argument_group("parts (none given: --classic and --growth)")
    part.add_argument("--classic", action="store_true",
                      help="the README's scenarios on the ~100-item realistic store (~5 min)")
    part.add_argument("--growth", action="store_true",
                      help="growth curve over --sizes on Guix-shaped stores (~10 min quiet at "
                      "the default sizes with --growth-where shm, twice that with the disk "
                      "rows; 50000 adds ~20); writes bench/out/growth.{md,csv,png}")
    part.add_argument("--small-items", action="store_true",
                      help="the five scenarios on the 2,076-item reference store, tmpfs and "
                      "disk (~8 min quiet); writes bench/out/small-items.{md,csv}")
    part.add_argument("--manifest-scale", action="store_true",
                      help="restore --dry-run, check and stats on a synthetic manifest of "
                      "--manifest-items items (~4 min, plus ~1 to synthesise it once)")
    parser.add_argument("--sizes", default="100,1000,10000", type=_sizes,
                        help="item counts of the growth curve [default: 100,1000,10000]")
    parser.add_argument("--growth-where", default="shm,disk", type=lambda s: s.split(","),
                        help="where growth restores go: shm, disk or both [default: shm,disk]")
    parser.add_argument("--manifest-items", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7, help="seed of the Guix-shaped stores")
    parser.add_argument("--reps", type=int, default=3, help="runs per scenario [default: 3]")
    parser.add_argument("--incstore-ref", metavar="REF",
                        help="time the incstore of this git revision instead of the working tree")
    classic = parser.add_argument_group("--classic options")
    classic.add_argument("--mb", type=int, default=500, help="target store size in MiB")
    classic.add_argument("--items", type=int, default=100)
    classic.add_argument("--where", default="shm,disk", type=lambda s: s.split(","))
    classic.add_argument("--nix", action="store_true", help="add nix copy as a second peer")
    classic.add_argument("--s3", action="store_true",
                         help="add save and restore through a local S3 server (localbucket)")
    classic.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--disk-dir", default="/var/tmp", type=Path,
                        help="where --small-items and --growth make their disk image (or, "
                        "without one, write their disk rows), and where --classic writes "
                        "[default: /var/tmp]")
    parser.add_argument("--disk-image-mb", type=int, metavar="N",
                        help="size of the ext4 image on a loop device that --small-items and "
                        "--growth time their disk rows on [default: sized from the stores]; "
                        "0: no image, write in --disk-dir itself")
    parser.add_argument("--shm-dir", default="/dev/shm", type=Path)
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    args = parser.parse_args()
    if shutil.which("zstd") is None or shutil.which("tar") is None:
        raise SystemExit("bench needs tar and zstd (apt-get install zstd)")
    if args.nix and shutil.which("nix") is None:
        raise SystemExit("--nix needs Debian's nix-bin")
    if not any((args.classic, args.growth, args.small_items, args.manifest_scale)):
        args.classic = args.growth = True
    if set(args.growth_where) - {"shm", "disk"}:
        raise SystemExit(f"--growth-where: shm, disk or shm,disk, not {args.growth_where}")
    if args.disk_image_mb is not None and 0 < args.disk_image_mb < disk.MIN_IMAGE_MB:
        raise SystemExit(f"--disk-image-mb: at least {disk.MIN_IMAGE_MB}, or 0 for no image")
    from bench import growth, manifestscale

    timing = use_incstore(args.incstore_ref)
    print(f"timing {timing}", file=sys.stderr)
    started = time.perf_counter()
    report: list[str] = []
    rows: list[Row] = []

    def section(title: str, text: str, took: float) -> None:
        block = f"## {title} ({took / 60:.1f} min)\n\n{text}\n"
        report.append(block)
        print(block, flush=True)

    if args.classic:
        t = time.perf_counter()
        classic_rows = bench(args)
        rows += classic_rows
        section("Classic: realistic store", table(classic_rows), time.perf_counter() - t)
    if args.small_items or args.growth:
        # the image is sized for the largest store it will hold, so build (or find) them all
        # first; one image serves both parts, each store's files wiped before the next
        sizes = sorted({*([growth.REFERENCE_ITEMS] if args.small_items else []),
                        *(args.sizes if args.growth else [])})
        stores = []
        for n in sizes:
            print(f"building or reusing the {n:,}-item store ...", file=sys.stderr)
            stores.append(guixstore.cached(guixstore.StoreSpec(n, args.seed))[1])
        with disk.provide(args.disk_dir, args.disk_image_mb, stores) as on_disk:
            if args.small_items:
                t = time.perf_counter()
                ref_rows = growth.reference(args.reps, ["shm", "disk"], on_disk, args.shm_dir,
                                            args.seed, timing)
                rows += ref_rows
                section("2,076-item reference store",
                        (growth.OUT / "small-items.md").read_text(), time.perf_counter() - t)
            if args.growth:
                t = time.perf_counter()
                growth_rows = growth.growth(args.sizes, args.reps, args.growth_where, on_disk,
                                            args.shm_dir, args.seed, timing)
                rows += growth_rows
                section("Growth curve", (growth.OUT / "growth.md").read_text(),
                        time.perf_counter() - t)
    if args.manifest_scale:
        t = time.perf_counter()
        syn, scale_rows = manifestscale.run(args.manifest_items, args.reps, args.shm_dir)
        rows += scale_rows
        text = manifestscale.report(syn, scale_rows, timing)
        (growth.OUT / "manifest-scale.md").write_text(text)
        section("Manifest scale", text, time.perf_counter() - t)
    print(f"total {(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in rows], indent=1))


if __name__ == "__main__":
    main()
