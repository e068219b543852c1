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
