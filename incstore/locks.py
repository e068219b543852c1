"""Lock: the daemon's advisory file locks, taken the way the daemon of each flavour takes them.

Guix's daemon uses fcntl (POSIX record) locks and Nix's uses flock; on Linux the two never see
each other, so a lock must be taken with the primitive of the store it protects. The files are
`big-lock` next to the DB (shared by every daemon session, exclusive for a DB swap), `gc.lock`
(exclusive during a collection, shared to hold one off) and `<store path>.lock` per item.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from incstore.errors import LockedError

Primitive = Literal["fcntl", "flock"]


def _acquire(fd: int, primitive: Primitive, exclusive: bool, blocking: bool) -> bool:
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
    try:
        (fcntl.lockf if primitive == "fcntl" else fcntl.flock)(fd, op)
    except (BlockingIOError, PermissionError):  # fcntl may report a conflict as EACCES
        return False
    return True


@contextlib.contextmanager
def hold(
    path: Path,
    primitive: Primitive,
    *,
    exclusive: bool,
    blocking: bool,
    what: str,
) -> Iterator[None]:
    """Hold a lock on `path` (created if missing) for the duration of the block.

    A non-blocking attempt that fails raises `LockedError` naming `what` is held by someone else.
    """
    # fcntl locks need a descriptor opened for writing to take an exclusive lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if not _acquire(fd, primitive, exclusive, blocking):
            raise LockedError(f"{what} is locked by another process ({path})")
        yield
    finally:
        os.close(fd)


class PathLock:
    """The daemon's per-item lock `<store path>.lock`, held while an item is being created.

    Protocol (Guix pathlocks.cc, Nix the same): lock the file; if it is not empty a previous
    holder deleted it after use (it wrote the stale marker `d`), so open it anew; when done,
    unlink it, write `d` into the still-open descriptor, and close.
    """

    def __init__(self, path: Path, primitive: Primitive) -> None:
        self.path = path
        self.primitive = primitive
        self.fd: int | None = None

    def acquire(self, *, blocking: bool = True) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if not _acquire(fd, self.primitive, exclusive=True, blocking=blocking):
                os.close(fd)
                return False
            if os.fstat(fd).st_size == 0:
                self.fd = fd
                return True
            os.close(fd)  # stale: its holder deleted it; try the new file

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.write(self.fd, b"d")
        os.close(self.fd)
        self.fd = None


def ensure_open_files(wanted: int) -> None:
    """Raise the soft limit on open files so that one lock per restored item fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
