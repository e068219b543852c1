"""Transfer directory: the tree that actions/cache extracted from cache entries (and that a save
fills for the next upload). Whoever could write a cache entry in a scope the job reads chose
every byte of it, and the restore step that reads it runs as root, so it is read like the
chunk store and more strictly:

- every component is opened through directory descriptors with O_NOFOLLOW: a symlinked
  `manifests` never makes a move reach a file outside the directory;
- only regular files are read or moved, opened with O_NONBLOCK (a FIFO at a record's name
  never hangs the step) and read no further than a size FORMAT.md states;
- names are checked before use (an entry's key, then blob names as the chunk store has
  them);
- a move renames a directory entry of this tree into the chunk store's own directory
  descriptors (copies across file systems), and what arrives is checked to be a regular file.

Anything hostile is a `Refusal`: the caller warns and treats that blob or record as missing
(a cache miss, never a hang, a traceback, or a file taken from elsewhere).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from incstore import regularfile
from incstore.backend import LocalBackend, valid_name
from incstore.dirfd import NOFOLLOW_DIR as _DIR
from incstore.dirfd import descend

MAX_RECORD_BYTES = 64 << 20  # an entry record: a 200,000-item base lists ~30 MB of names
MAX_DEPTH = 4  # names nest at most `<entry key>/guix/<key>.narinfo`


class Refusal(Exception):
    """A name in the transfer directory that is not what the format allows there."""


class TransferDir:
    """The transfer directory at `path` (its own path is the job's choice, not the cache's:
    only what is inside it is hostile)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # reading ----------------------------------------------------------------------------
    def _root(self) -> int:
        try:
            return os.open(self.path, _DIR)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise Refusal(f"{self.path} is not a directory ({e.strerror})") from None

    def _dir(self, parts: list[str], name: str) -> int:
        """A descriptor on the subdirectory `parts`, one component at a time, none followed."""
        root = self._root()
        try:
            return descend(root, parts)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise Refusal(f"{name}: {e.filename} is not a directory ({e.strerror})") from None
        finally:
            os.close(root)

    def _parent(self, name: str) -> tuple[int, str]:
        """A descriptor on the directory holding blob `name` (checked), and its base name."""
        if not valid_name(name) or name.count("/") >= MAX_DEPTH:
            raise Refusal(f"{name!r} is not a blob name")
        *dirs, base = name.split("/")
        return self._dir(dirs, name), base

    def read(self, name: str, limit: int) -> bytes:
        """The regular file `name`, refused past `limit` bytes. FileNotFoundError if absent."""
        parent, base = self._parent(name)
        try:
            return _read_at(parent, base, limit, name)
        finally:
            os.close(parent)

    # moving -----------------------------------------------------------------------------
    def move_into(self, name: str, chunks: LocalBackend, dest: str | None = None) -> bool:
        """Move regular file `name` to `dest` (by default the same name) in the chunk store,
        replacing what is there. False when it is absent; Refusal when it is not a regular
        file."""
        dest = name if dest is None else dest
        parent, base = self._parent(name)
        try:
            try:
                st = os.stat(base, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if not stat.S_ISREG(st.st_mode):
                raise Refusal(f"{name} is not a regular file")
            dst_dir, dst_base = chunks.blob_dir(dest)
            try:
                os.rename(base, dst_base, src_dir_fd=parent, dst_dir_fd=dst_dir)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                _copy_across(parent, base, chunks, dest)
                return True
            # what was renamed is whatever sat at the name then: if someone swapped it, the
            # swapped thing leaves again
            moved = os.stat(dst_base, dir_fd=dst_dir, follow_symlinks=False)
            if not stat.S_ISREG(moved.st_mode):
                with contextlib.suppress(OSError):
                    os.unlink(dst_base, dir_fd=dst_dir)
                raise Refusal(f"{name} is not a regular file")
            return True
        finally:
            os.close(parent)

    # writing ----------------------------------------------------------------------------
    def remove(self, name: str) -> None:
        """Remove blob `name` if it is there (whatever it is: nothing is followed)."""
        with contextlib.suppress(FileNotFoundError, Refusal):
            parent, base = self._parent(name)
            try:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(base, dir_fd=parent)
            finally:
                os.close(parent)

    def clear(self) -> None:
        """Empty the directory (made if missing). Whatever sits at its own name that is not a
        directory (a symlink an extraction planted) is removed first; nothing inside is
        followed (shutil.rmtree works by descriptors)."""
        with contextlib.suppress(FileNotFoundError):
            st = self.path.lstat()
            if not stat.S_ISDIR(st.st_mode):
                self.path.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = self._root()
        try:
            with os.scandir(fd) as entries:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            for name, is_dir in children:
                if is_dir:
                    _remove_tree(fd, name)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)


def _remove_tree(parent: int, name: str) -> None:
    """Remove directory `name` in `parent` and everything in it, by descriptors, without
    recursion (a hostile tree may be deep) and without following anything (shutil.rmtree
    takes no dir_fd before Python 3.11)."""
    stack: list[tuple[int, str, int]] = [(parent, name, os.open(name, _DIR, dir_fd=parent))]
    try:
        while stack:
            up, here, fd = stack[-1]
            with os.scandir(fd) as entries:
                listing = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            sub = next((n for n, is_dir in listing if is_dir), None)
            for n, is_dir in listing:
                if not is_dir:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(n, dir_fd=fd)
            if sub is not None:
                stack.append((fd, sub, os.open(sub, _DIR, dir_fd=fd)))
                continue
            os.close(fd)
            stack.pop()
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(here, dir_fd=up)
    finally:
        for _, _, fd in stack:
            os.close(fd)


def _read_at(parent: int, base: str, limit: int, name: str) -> bytes:
    try:
        return regularfile.read(base, limit, follow=False, dir_fd=parent)
    except FileNotFoundError:
        raise
    except regularfile.NotRegular:
        raise Refusal(f"{name} is not a regular file") from None
    except regularfile.TooLarge:
        raise Refusal(f"{name} is larger than {limit} bytes") from None
    except OSError as e:
        raise Refusal(f"{name} cannot be opened ({e.strerror})") from None


def _copy_across(parent: int, base: str, chunks: LocalBackend, name: str) -> None:
    """The move of `base` into another file system: a copy through the chunk store's own
    atomic staging, then the source removed."""
    try:
        fd = regularfile.open_fd(base, follow=False, dir_fd=parent)
    except regularfile.NotRegular:
        raise Refusal(f"{name} is not a regular file") from None
    try:
        with chunks.stage(name) as out:
            while block := os.read(fd, 1 << 20):
                out.write(block)
            staged = out.staged
        chunks.publish([staged], replace=True)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(base, dir_fd=parent)
