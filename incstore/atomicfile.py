"""Atomic file: a file that appears under its final name complete and durable, or not at all.

Every file incstore writes (chunks, narinfos, manifests, DB copies, the `schema` file) goes
through here: write to a temporary name in the same directory, fsync it, rename it over the final
name, fsync the directory. A crash leaves either the old file or the new one, plus at worst a
`.tmp-` file that `is_temp_name` recognises so that later runs can sweep it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from incstore import faults

TEMP_PREFIX = ".tmp-incstore-"


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def writer_alive(pid: int) -> bool:
    """Whether the process that named a temporary file after itself still runs."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_owner(name: str, prefix: str) -> int | None:
    pid = name[len(prefix) :].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def sweep(directory: Path) -> list[str]:
    """Delete the temporary files that writers which have died left in `directory`."""
    removed = []
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if not is_temp_name(entry.name):
                continue
            pid = temp_owner(entry.name, TEMP_PREFIX)
            if pid is not None and writer_alive(pid):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def temp_path_for(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}-{final.name}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc_syncfs() -> Any:
    """libc's syncfs(2), looked up on first use (ctypes costs an import on every run)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs  # the symbols already in the process
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


def syncfs(fd: int) -> None:
    """Flush everything written to the file system holding `fd`: one call makes a whole batch
    of files (and renames) durable, where an fsync each would wait on the disk per file."""
    fn = _libc_syncfs()
    if fn is None or fn(fd) != 0:
        os.sync()


class AlreadyExists(Exception):
    """`atomic_writer(create_only=True)` found the final name taken by another writer."""


@contextlib.contextmanager
def atomic_writer(final: Path, mode: int = 0o644, *, create_only: bool = False
                  ) -> Iterator[BinaryIO]:
    """Yield a binary file; on a clean exit it replaces `final` atomically, else it is removed.

    With `create_only`, an existing `final` is never replaced (the file is linked into place,
    which fails if the name exists) and `AlreadyExists` is raised instead: the first of two
    racing writers of a write-once file wins.
    """
    tmp = temp_path_for(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        faults.point("atomicfile.before-rename")
        if create_only:
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise AlreadyExists(str(final)) from None
            os.unlink(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)
    faults.point("atomicfile.after-rename")


def write_bytes(final: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(final, mode) as f:
        f.write(data)
