"""The disk the bench's disk rows are timed on: an ext4 image on a loop device that the bench
makes, mounts without `discard`, and takes down again, or, where loop devices cannot be made,
a plain directory, labelled as such.

Why: CI runners write to a disk, not tmpfs, so a restore's disk row is the one users feel; but
this machine's root file system is ext4 mounted with `discard`, where every deleted file is
trimmed online, and the bench deletes a whole store between runs: disk timings there swing up
to 10x from one run to the next. An image the bench controls fixes what it can:

- mounted `nodiscard`, so wiping a store between runs trims nothing;
- made with `mkfs.ext4 -E lazy_itable_init=0,lazy_journal_init=0`, so no `ext4lazyinit`
  thread zeroes inode tables in the background while runs are timed;
- zero-filled once (`dd oflag=direct`) before `mkfs`, so no run is the first to write a block
  of the image file (which on the host is an extent conversion, journalled);
- attached with `losetup --direct-io=on` where the kernel allows it, so the image's blocks are
  not cached twice (once in the loop file system, once in the host's page cache) and a flush
  reaches the host disk as it would on a runner's disk.

It still sits on the host's disk: `fsync`, `syncfs` and writeback cost what the host disk
makes them cost, which is the point, and the host's own mood is not under the bench's control.

`provide` is a context manager: the image, its loop device and mount point are removed on
leaving it, also on an error, Ctrl-C, SIGTERM or SIGHUP; an image left behind by a bench
that was killed outright (its pid gone) is swept the next time.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench.guixstore import Summary

PREFIX = "incstore-bench-disk-"
# ext4's smallest sensible image for the bench: a journal and a few stores' worth of inodes
MIN_IMAGE_MB = 256
# kept free on the host beside the image, so that the host file system does not fill up
HOST_MARGIN_MB = 1024


@dataclass(frozen=True)
class Disk:
    """Where the disk rows write (`root`), what the rows call it (`where`, the table's column)
    and one line saying what it is (`note`, for the reports)."""

    root: Path
    where: str
    note: str


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mount_options(path: Path) -> tuple[str, str, str]:
    """(device, file-system type, options) of the mount holding `path`."""
    best: tuple[str, str, str, str] = ("", "", "", "")
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype, opts = line.split()[:4]
            mnt = mnt.replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best[1]):
                best = (dev, mnt, fstype, opts)
    return best[0], best[2], best[3]


def directory(path: Path) -> Disk:
    """Disk rows straight into the directory `path`, on whatever file system holds it: the
    fallback, and --classic's disk rows. Labelled with the path so that no table passes its
    rows off as the controlled disk's."""
    dev, fstype, opts = mount_options(path)
    discard = ", mounted with discard: timings swing" if "discard" in opts.split(",") else ""
    return Disk(path, str(path), f"`{path}`: a directory on {dev} ({fstype}{discard}), not an "
                f"image the bench controls")


def need_mb(stores: Iterable[Summary]) -> int:
    """Image size for the largest of `stores`, in MiB, from what growth.store_rows keeps on the
    disk at once: the chunk store, the manifest and the archive of one store, and two restored
    copies of it (incstore's and the monolith's) for the disk restores.

    Bounds, not estimates: every file and directory is charged a whole 4 KiB block on top of
    its bytes, compressed data is charged half the NAR (zstd -3 makes about a third of it), and
    a quarter is added for ext4's metadata and the journal.
    """
    worst = 0
    for s in stores:
        tree = s.nar_bytes + s.entries * 4096  # one restored copy
        cache = s.nar_bytes // 2 + s.items * 2 * 4096  # a chunk and a narinfo per item
        archive = s.nar_bytes // 2
        manifest = s.items * 2048
        worst = max(worst, 2 * tree + cache + archive + manifest)
    return max(MIN_IMAGE_MB, math.ceil(worst * 1.25 / 2**20) + 64)


def need_inodes(stores: Iterable[Summary]) -> int:
    """Inodes for the largest of `stores`: two restored copies, the chunk store's two files per
    item, and room to spare (mkfs's default ratio would run out on the 50,000-item store)."""
    worst = max((2 * s.entries + 3 * s.items for s in stores), default=0)
    return int(worst * 1.5) + 16384


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv)}: exit {done.returncode}: "
                      f"{(done.stderr or done.stdout).strip()}")
    return done.stdout.strip()


def _mounted(mnt: Path) -> bool:
    real = os.path.realpath(mnt)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == real for line in f)


def _devices_of(image: Path) -> list[str]:
    """The loop devices backed by `image` (`losetup -j` lines are `/dev/loopN: [...]: ...`)."""
    try:
        out = _run(["losetup", "-j", str(image)])
    except OSError:
        return []
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def _umount(mnt: Path) -> None:
    """Unmount, waiting a little for processes interrupted with the bench to let go of their
    files; lazily as a last resort (the kernel then finishes it when they do)."""
    for _ in range(20):
        if not _mounted(mnt):
            return
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    _log(f"disk: {mnt} still busy after 10 s: unmounting it lazily")
    subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True)


def _teardown(image: Path, mnt: Path, device: str | None) -> None:
    """Unmount, detach and delete, each step tried even when an earlier one failed."""
    problems: list[str] = []
    try:
        _umount(mnt)
    except OSError as e:
        problems.append(str(e))
    # a device still in use is detached as soon as it is released (the kernel's autoclear)
    for dev in {*(_devices_of(image) if image.exists() else []), *([device] if device else [])}:
        done = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
        if done.returncode != 0 and "No such device" not in done.stderr:
            problems.append(f"losetup -d {dev}: {done.stderr.strip()}")
    for step in (image.unlink, mnt.rmdir):
        try:
            step()
        except FileNotFoundError:
            pass
        except OSError as e:
            problems.append(str(e))
    if problems:
        _log("disk: clean-up incomplete: " + "; ".join(problems))


def sweep_stale(parent: Path) -> None:
    """Take down images and mount points that a killed bench left in `parent`: those named for
    a pid that no longer runs."""
    if not parent.is_dir():
        return
    stale: set[int] = set()
    for entry in parent.iterdir():
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)\.(img|mnt)", entry.name)
        if m and int(m.group(1)) != os.getpid() and not Path(f"/proc/{m.group(1)}").exists():
            stale.add(int(m.group(1)))
    for pid in sorted(stale):
        _log(f"disk: removing the image a killed bench (pid {pid}) left in {parent}")
        _teardown(parent / f"{PREFIX}{pid}.img", parent / f"{PREFIX}{pid}.mnt", None)


def _free_mb(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize // 2**20


def _make(image: Path, mnt: Path, size_mb: int, inodes: int) -> tuple[str, bool]:
    """Zero-fill the image, attach it, make the file system and mount it; returns the loop
    device and whether it does direct I/O."""
    _run(["dd", "if=/dev/zero", f"of={image}", "bs=16M", f"count={math.ceil(size_mb / 16)}",
          "oflag=direct", "status=none"])
    device = _run(["losetup", "--find", "--show", "--direct-io=on", str(image)])
    dio_flag = Path(f"/sys/block/{Path(device).name}/loop/dio")
    dio = dio_flag.exists() and dio_flag.read_text().strip() == "1"
    # -m 0: nothing reserved for root (we are root, and the sizing has its own margin);
    # -E nodiscard: mkfs's own trim of the device would punch holes in the zero-filled image
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(inodes), "-L", "incstore-bench",
          "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", device])
    mnt.mkdir()
    _run(["mount", "-t", "ext4", "-o", "nodiscard", device, str(mnt)])
    return device, dio


class _Interrupted(SystemExit):
    """SIGTERM or SIGHUP, raised as an exception so that `provide`'s clean-up runs."""


def _raise_on(signum: int, _frame: FrameType | None) -> None:
    raise _Interrupted(128 + signum)


@contextmanager
def provide(parent: Path, image_mb: int | None, stores: list[Summary]) -> Iterator[Disk]:
    """The disk for the disk rows of `stores`: an ext4 image of `image_mb` MiB (None: sized
    for the largest store) on a loop device, image and mount point in `parent`; with
    `image_mb` 0, or when no loop device can be made and no size was asked for, `parent`
    itself (`directory`)."""
    if image_mb == 0:
        yield directory(parent)
        return
    why_not = None
    if os.geteuid() != 0:
        why_not = "not root"
    else:
        missing = [t for t in ("losetup", "mkfs.ext4", "mount", "umount", "dd")
                   if shutil.which(t) is None]
        if missing:
            why_not = f"{', '.join(missing)} not found"
        elif not Path("/dev/loop-control").exists():
            why_not = "no /dev/loop-control"
    if why_not:
        if image_mb is not None:
            raise SystemExit(f"--disk-image-mb {image_mb}: cannot make a loop device ({why_not})")
        _log(f"disk: cannot make a loop device ({why_not}): disk rows go to {parent} instead")
        yield directory(parent)
        return
    sweep_stale(parent)
    size_mb = image_mb or need_mb(stores)
    if image_mb and image_mb < need_mb(stores):
        # a full image fails commands with ENOSPC, which the tables would report as findings
        _log(f"disk: warning: --disk-image-mb {image_mb} is below the {need_mb(stores)} MiB "
             f"these stores may need")
    inodes = need_inodes(stores)
    free = _free_mb(parent)
    if free < size_mb + HOST_MARGIN_MB:
        raise SystemExit(f"disk: a {size_mb} MiB image does not fit in {parent} ({free} MiB "
                         f"free, {HOST_MARGIN_MB} kept free): pass another --disk-dir, or "
                         f"--disk-image-mb 0 to write there directly")
    image = parent / f"{PREFIX}{os.getpid()}.img"
    mnt = parent / f"{PREFIX}{os.getpid()}.mnt"
    handlers = {s: signal.signal(s, _raise_on) for s in (signal.SIGTERM, signal.SIGHUP)}
    device: str | None = None
    try:
        t = time.perf_counter()
        try:
            device, dio = _make(image, mnt, size_mb, inodes)
        except OSError as e:
            if image_mb is not None:
                raise SystemExit(f"disk: cannot make the image: {e}") from e
            _log(f"disk: cannot make a loop device ({e}): disk rows go to {parent} instead")
            _teardown(image, mnt, device)
            yield directory(parent)
            return
        host_dev, host_fs, host_opts = mount_options(parent)
        note = (f"`loop`: a {size_mb:,} MiB ext4 image ({inodes:,} inodes) on {device}"
                f"{' (direct I/O)' if dio else ' (buffered: no direct I/O here)'}, mounted "
                f"nodiscard, made by the bench in {parent} on {host_dev} ({host_fs}"
                f"{', discard' if 'discard' in host_opts.split(',') else ''})")
        _log(f"disk: {note}, in {time.perf_counter() - t:.1f} s")
        yield Disk(mnt, "loop", note)
    finally:
        # a second Ctrl-C must not cut the clean-up short
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if image.exists() or mnt.exists():
                _teardown(image, mnt, device)
                _log(f"disk: {image.name} unmounted, detached and deleted")
        finally:
            signal.signal(signal.SIGINT, previous)
            for s, h in handlers.items():
                signal.signal(s, h)
