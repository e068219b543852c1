"""Regular file: a file incstore reads that must be a plain file, opened so that whatever sits
at its name instead cannot hang or misuse the reader.

Chunks, narinfos, `nix-cache-info`, manifests and the DB's `schema` file may all live where
someone else can write. A FIFO at such a name would block a plain `open()` forever, a
directory would raise an unexpected error, and a device could be read without end. Here the
file is opened with O_NONBLOCK (and, where the caller asks, O_NOFOLLOW), checked to be a
regular file on its own descriptor, and read no further than a limit.
"""

from __future__ import annotations

import fcntl
import io
import os
import stat
from pathlib import Path


class NotRegular(OSError):
    """The name exists but is not a regular file (a directory, FIFO, socket or device)."""


class TooLarge(OSError):
    """The file is larger than the caller's limit."""


def open_fd(path: str | Path, *, follow: bool = True, dir_fd: int | None = None) -> int:
    """A read-only descriptor on a regular file (`path` relative to `dir_fd` when given), in
    blocking mode again once opened."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(f"{path} is not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_binary(path: str | Path, *, follow: bool = True, dir_fd: int | None = None
                ) -> io.BufferedReader:
    return os.fdopen(open_fd(path, follow=follow, dir_fd=dir_fd), "rb")


def read(path: str | Path, limit: int, *, follow: bool = True, dir_fd: int | None = None
         ) -> bytes:
    """The whole file, refusing one larger than `limit` bytes."""
    with open_binary(path, follow=follow, dir_fd=dir_fd) as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise TooLarge(f"{path} is larger than {limit} bytes")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{path} is larger than {limit} bytes")
    return data
