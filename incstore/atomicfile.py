"""Atomic file: a file that appears under its final name complete and durable, or not at all.

Every file incstore writes (chunks, narinfos, manifests, DB copies, the `schema` file) goes
through here: write to a temporary name in the same directory, fsync it, rename it over the final
name, fsync the directory. A crash leaves either the old file or the new one, plus at worst a
`.tmp-` file that `is_temp_name` recognises so that later runs can sweep it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-incstore-"


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def temp_path_for(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{final.name}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(final: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file; on a clean exit it replaces `final` atomically, else it is removed."""
    tmp = temp_path_for(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)


def write_bytes(final: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(final, mode) as f:
        f.write(data)
