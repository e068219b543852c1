"""Directory descriptor: a directory below another, opened one component at a time without
following a symlink, so that a symlink planted anywhere on the way (in a chunk store, a
transfer directory) is refused instead of leading elsewhere."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def descend(fd: int, parts: Iterable[str], *, create: bool = False) -> int:
    """A new descriptor on the directory `parts` below the open directory `fd` (left open),
    each component made (mode 0755) first when `create`. The OSError of a component that is
    missing or not a directory names that component."""
    current = os.dup(fd)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=current)
            child = os.open(part, NOFOLLOW_DIR, dir_fd=current)
            os.close(current)
            current = child
    except BaseException:
        os.close(current)
        raise
    return current
