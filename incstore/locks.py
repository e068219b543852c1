"""Lock: the daemon's advisory file locks, taken the way the daemon of each flavour takes them.

Guix's daemon uses fcntl (POSIX record) locks and Nix's uses flock; on Linux the two never see
each other, so a lock must be taken with the primitive of the store it protects. The files are
`big-lock` next to the DB (shared by every daemon session, exclusive for a DB swap), `gc.lock`
(exclusive during a collection, shared to hold one off) and `<store path>.lock` per item (see
`storedir.ItemLock`).

Lock files live in directories other processes may write, so they are opened without following
a symlink, without blocking on a FIFO, and refused unless they are regular files: as root, a
planted symlink must never make incstore create or write a file elsewhere.

POSIX record locks belong to the process and file, not to the descriptor: closing *any*
descriptor of a locked file drops the lock. Each lock file is therefore opened once, by the one
object that holds its lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from incstore.errors import LockedError, StoreError

Primitive = Literal["fcntl", "flock"]
LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_lock_file(name: str | Path, *, dir_fd: int | None = None, what: str | None = None
                   ) -> int:
    """Open (creating if needed) a lock file; refuse a symlink or anything not a regular file.

    fcntl needs a descriptor opened for writing to take an exclusive lock, hence O_RDWR.
    """
    label = what or str(name)
    try:
        fd = os.open(name, LOCK_FLAGS, 0o600, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):
            raise StoreError("is a symbolic link; refusing to use it as a lock file",
                             item=label) from None
        raise StoreError(f"cannot open the lock file: {e.strerror}", item=label) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError("is not a regular file; refusing to use it as a lock file",
                             item=label)
        # O_NONBLOCK was only for the open (a FIFO); it must not make lock waits spin
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def acquire(fd: int, primitive: Primitive, exclusive: bool, blocking: bool) -> bool:
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
    try:
        (fcntl.lockf if primitive == "fcntl" else fcntl.flock)(fd, op)
    except (BlockingIOError, PermissionError):  # fcntl may report a conflict as EACCES
        return False
    return True


class HeldLock:
    """A lock held on a file until `release` (or the end of a `with` block)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def take(path: Path, primitive: Primitive, *, exclusive: bool, blocking: bool, what: str
         ) -> HeldLock:
    """Take a lock on `path` (created if missing); a non-blocking attempt that fails raises
    `LockedError` saying `what` is held by someone else."""
    fd = open_lock_file(path)
    try:
        if not acquire(fd, primitive, exclusive, blocking):
            raise LockedError(f"{what} is locked by another process ({path})")
    except BaseException:
        os.close(fd)
        raise
    return HeldLock(fd)


@contextlib.contextmanager
def hold(path: Path, primitive: Primitive, *, exclusive: bool, blocking: bool, what: str
         ) -> Iterator[HeldLock]:
    """`take` for the duration of a block."""
    with take(path, primitive, exclusive=exclusive, blocking=blocking, what=what) as held:
        yield held


def ensure_open_files(wanted: int) -> int:
    """Raise the soft limit on open files towards `wanted`; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    return wanted if soft == resource.RLIM_INFINITY else soft
